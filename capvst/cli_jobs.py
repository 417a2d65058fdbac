"""Queued-job commands: submit, status, report, cancel, resume, worker, scheduler, examples.

Only this module (and cli.py) of ``capvst/`` calls into ``scheduler/`` and ``worker/``, lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

from .images import OUTPUT_FORMATS
from .types import MODES


def _client():  # type: ignore[no-untyped-def]
    from scheduler.client import Client

    from .cli import _settings

    return Client(_settings())


def _fail_job(exc: Exception) -> int:
    from .cli import _Fail

    code = getattr(exc, "exit_code", 1)
    raise _Fail(str(exc), code)


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", metavar="MANIFEST",
                   help="s3://, file:// or a local path (.jsonl or .csv); a local file is "
                        "uploaded next to the outputs")
    p.add_argument("--output", metavar="PREFIX",
                   help="where outputs and the report go (default: MANIFEST's folder + "
                        "'/<manifest stem>-output')")
    p.add_argument("--mode", choices=MODES, default="photorealistic",
                   help="default mode of items (default photorealistic)")
    p.add_argument("--max-size", type=int, default=1280, metavar="N",
                   help="default long-edge limit of items (default 1280)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="png",
                   help="default output format (default png)")
    p.add_argument("--wait", action="store_true",
                   help="show progress until the job is final, then the summary")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_submit)


def submit_parser() -> argparse.ArgumentParser:
    """The parser of ``capvst-submit``."""
    p = argparse.ArgumentParser(
        prog="capvst-submit",
        description="Submit a manifest of content x style items as a job. Prints the job id. "
                    "Exit 0: all items succeeded or were skipped; 3: finished with failed items;"
                    " 2: the manifest as a whole was unusable.")
    _submit_args(p)
    return p


def _print_summary(st: dict[str, Any], as_json: bool) -> None:
    from .cli import _info

    if as_json:
        print(json.dumps(st), flush=True)
        return
    msg = (f"job {st['job']} {st['state']}: {st['succeeded']} succeeded, {st['skipped']} "
           f"skipped, {st['failed']} failed of {st['total']} items "
           f"in {st['elapsed_seconds']:.1f} s")
    _info(msg)
    if st.get("manifest_error"):
        _info(f"manifest unusable: {st['manifest_error']}")
    elif st.get("valid") == 0:
        _info("no line of the manifest is a valid item")
    if st.get("report"):
        _info(f"report: {st['report']}")


def _progress_style(as_json: bool) -> str:
    """A live bar on a terminal, periodic lines in logs, nothing with --json."""
    if as_json:
        return "none"
    if sys.stderr.isatty() or os.environ.get("CAPVST_PROGRESS") == "bar":
        return "bar"
    return "lines"


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit, optionally wait."""
    from pydantic import ValidationError

    from scheduler.client import JobError, exit_code_for

    from .cli import _Fail
    from .manifest import JobOptions

    try:
        options = JobOptions(mode=args.mode, max_size=args.max_size, format=args.format)
    except ValidationError as exc:
        raise _Fail(f"bad option: {exc.errors()[0]['msg']}", 2) from None
    client = _client()
    try:
        rec = client.submit(args.manifest, args.output, options)
    except JobError as exc:
        return _fail_job(exc)
    if not args.json or not args.wait:
        print(json.dumps({"job": rec.id, "output": rec.output}) if args.json else rec.id,
              flush=True)
    if not args.wait:
        return 0
    st = client.wait(rec.id, progress=_progress_style(args.json))
    st["exit_code"] = exit_code_for(st)
    _print_summary(st, args.json)
    return int(st["exit_code"])


def cmd_status(args: argparse.Namespace) -> int:
    """Counts, rate, ETA."""
    from scheduler.client import JobError

    try:
        st = _client().status(args.job)
    except JobError as exc:
        return _fail_job(exc)
    if args.json:
        print(json.dumps(st))
        return 0
    total = st["total"] if st["total"] is not None else f"{st['expanded']}+ (expanding)"
    eta = f"{st['eta_seconds']:.0f} s" if st["eta_seconds"] is not None else "-"
    print(f"job       {st['job']}\nstate     {st['state']}"
          + (" (cancel requested)" if st["cancel_requested"] and st["state"] != "cancelled"
             else "")
          + f"\nitems     {total}\nsucceeded {st['succeeded']}\nskipped   {st['skipped']}\n"
          f"failed    {st['failed']}\nqueued    {st['queued']}\n"
          f"rate      {st['rate_per_second']:.2f} items/s\neta       {eta}")
    if st.get("manifest_error"):
        print(f"manifest  unusable: {st['manifest_error']}")
    if st.get("report"):
        print(f"report    {st['report']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Where the report is and the failed items."""
    from scheduler.client import JobError

    try:
        uri, failed = _client().report(args.job, args.output)
        rows = list(failed)
    except JobError as exc:
        return _fail_job(exc)
    rows.sort(key=lambda r: r["line"])
    if args.json:
        print(json.dumps({"report": uri, "failed": rows}))
        return 0
    print(f"report: {uri}")
    print(f"{len(rows)} failed items")
    for r in rows:
        err = r.get("error") or {}
        print(f"  line {r['line']}: {err.get('code')}: {err.get('message')} "
              f"({r.get('content')})")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Request cancellation."""
    from scheduler.client import JobError

    try:
        _client().cancel(args.job)
    except JobError as exc:
        return _fail_job(exc)
    print(f"cancel requested for {args.job}: queued items will fail with 'cancelled'",
          file=sys.stderr)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Re-enqueue every non-final item."""
    from scheduler.client import JobError, exit_code_for

    from .cli import _info

    client = _client()
    try:
        rec = client.resume(args.job, args.output, progress=_info)
    except JobError as exc:
        if exc.exit_code == 0:
            _info(str(exc))
            return 0
        return _fail_job(exc)
    _info(f"job {rec.id} resumed")
    if not args.wait:
        return 0
    st = client.wait(rec.id, progress=_progress_style(False))
    st["exit_code"] = exit_code_for(st)
    _print_summary(st, False)
    return int(st["exit_code"])


def _celery(argv: list[str]) -> int:
    """Replace this process with celery (signals then reach the worker directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if argv[:1] != ["-A"]:
        argv = ["-A", "worker", *argv]
    os.execvp(sys.executable, [sys.executable, "-m", "celery", *argv])
    return 0  # not reached


def _has(extra: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") or (len(f) == 2 and a.startswith(f) and
                                                  len(a) > 2) for a in extra for f in flags)


def cmd_worker(args: argparse.Namespace) -> int:
    """A stylize worker: one process (one per GPU), prefetch 1, late acks, events on."""
    extra = list(args.celery_args)
    argv = ["worker", "-Q", "capvst.stylize", "-E"]
    if not _has(extra, "-c", "--concurrency"):
        argv += ["--concurrency", "1"]
    if not _has(extra, "-n", "--hostname"):
        argv += ["--hostname", "stylize@%h"]
    if not _has(extra, "-l", "--loglevel"):
        argv += ["--loglevel", "INFO"]
    return _celery(argv + ["--prefetch-multiplier", "1", *extra])


def cmd_scheduler(args: argparse.Namespace) -> int:
    """The scheduler service: consumes capvst.schedule (expansion and reports)."""
    extra = list(args.celery_args)
    argv = ["-A", "scheduler.app", "worker", "-Q", "capvst.schedule", "-E"]
    if not _has(extra, "-c", "--concurrency"):
        argv += ["--concurrency", "2"]
    if not _has(extra, "-n", "--hostname"):
        argv += ["--hostname", "scheduler@%h"]
    if not _has(extra, "-l", "--loglevel"):
        argv += ["--loglevel", "INFO"]
    return _celery(argv + ["--prefetch-multiplier", "1", *extra])


def cmd_examples(args: argparse.Namespace) -> int:
    """Copy the bundled example images and manifest into a folder."""
    src = os.path.join(os.path.dirname(__file__), "examples")
    os.makedirs(args.folder, exist_ok=True)
    for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(args.folder, name))
    print(os.path.join(os.path.abspath(args.folder), "manifest.jsonl"))
    return 0


def add_commands(sub: Any) -> None:
    """Register the job commands on the ``capvst`` parser."""
    p = sub.add_parser("submit", help="submit a manifest as a job (same as capvst-submit)",
                       description=submit_parser().description)
    _submit_args(p)
    p = sub.add_parser("status", help="counts per state, rate and ETA of a job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("report", help="where a job's report is, and its failed items")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--output", metavar="PREFIX", help="the job's output prefix, when Redis no "
                   "longer knows the job")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("cancel", help="stop a job (queued items fail with 'cancelled')")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("resume", help="re-enqueue every item of a job that is not final",
                       description="Re-enqueue every item of a job without a final result; "
                       "also un-cancels a cancelled job. After Redis lost everything, --output "
                       "tells where the job record is.")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--output", metavar="PREFIX", help="the job's output prefix")
    p.add_argument("--wait", action="store_true", help="wait until the job is final")
    p.set_defaults(func=cmd_resume)
    for name, fn, text in (
            ("worker", cmd_worker, "run a stylize worker (celery options pass through)"),
            ("scheduler", cmd_scheduler, "run the scheduler service (celery options pass "
                                         "through)")):
        p = sub.add_parser(name, help=text, description=text, prefix_chars="\0")
        p.add_argument("celery_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=fn)
    p = sub.add_parser("examples", help="copy the bundled example images and manifest")
    p.add_argument("folder", metavar="FOLDER")
    p.set_defaults(func=cmd_examples)


__all__ = ["add_commands", "submit_parser"]
