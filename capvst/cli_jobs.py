"""Queued-job commands: submit, status, report, cancel, resume, worker, scheduler, examples.

Only this module (and cli.py) of ``capvst/`` calls into ``scheduler/`` and ``worker/``, lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

from .cli_common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Fail,
    Parser,
    add_encoder_arguments,
    check_broker,
    check_s3_credentials,
    info,
    load_settings,
    parser_kwargs,
    weights,
)
from .images import OUTPUT_FORMATS
from .types import MODES, SUBMIT_FORMATS

if TYPE_CHECKING:
    from scheduler.client import Client

    from .settings import Settings


def _client(settings: Settings | None = None) -> Client:
    """A job client, after one quick round trip to the broker (exit 4 when unreachable)."""
    from scheduler.client import Client

    settings = settings or load_settings()
    check_broker(settings)
    return Client(settings)


def _fail_job(exc: Exception) -> int:
    raise Fail(str(exc), getattr(exc, "exit_code", EXIT_ERROR))


JOB_HELP = "the job id that capvst-submit printed (e.g. 20261126-163954-a1b2c3)"
JSON_HELP = "print one JSON object on stdout instead of text"


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", metavar="MANIFEST",
                   help="s3://, file:// or a local path: JSON Lines, CSV with a header, an S3 "
                        "Batch Operations CSV or an S3 Inventory manifest.json; a local file "
                        "is uploaded next to the outputs")
    p.add_argument("--output", metavar="PREFIX",
                   help="where outputs and the report go (default: MANIFEST's folder + "
                        "'/<manifest stem>-output')")
    p.add_argument("--manifest-format", choices=SUBMIT_FORMATS, metavar="FORMAT",
                   help="jsonl, csv (with a header), s3-batch (bucket,key[,versionId] rows, "
                        "no header) or s3-inventory (an S3 Inventory manifest.json); default: "
                        "told from the manifest's first line")
    p.add_argument("--style", action="append", metavar="URI", dest="styles",
                   help="style of every line that names none; repeat to mix styles (needed "
                        "for s3-batch and s3-inventory, whose lines are only contents)")
    p.add_argument("--style-weights", type=weights, metavar="W1,W2",
                   help="mixing weights, one per --style (normalised to sum 1; default equal)")
    p.add_argument("--mode", choices=MODES, default="photorealistic",
                   help="default mode of items (default photorealistic)")
    p.add_argument("--max-size", type=int, default=1280, metavar="N",
                   help="default long-edge limit of items; 0 is full resolution (default 1280)")
    p.add_argument("--tile", default="auto", metavar="auto|off|N",
                   help="default tiling of items: auto (tiled when an image does not fit the "
                        "worker's memory budget), off, or a tile side in pixels (default auto)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="png",
                   help="default output format (default png)")
    add_encoder_arguments(p, "default of items: ")
    p.add_argument("--wait", action="store_true",
                   help="show progress until the job is final, then the summary; the exit "
                        "code then tells the job's outcome")
    p.add_argument("--json", action="store_true",
                   help="print JSON on stdout: {job, output} at once, or with --wait the final "
                        "status")
    p.set_defaults(func=cmd_submit)


SUBMIT_DESCRIPTION = ("Submit a manifest of content x style items as a job and print the job "
                      "id. Needs the broker (CAPVST_BROKER_URL) and, for s3:// URIs, S3 "
                      "credentials; the scheduler and workers do the work.")


def submit_parser() -> argparse.ArgumentParser:
    """The parser of ``capvst-submit``."""
    p = Parser(prog="capvst-submit", **parser_kwargs(description=SUBMIT_DESCRIPTION))
    _submit_args(p)
    return p


UNTRAINED_NOTE = ("items were computed by the UNTRAINED network (a worker without a "
                  "checkpoint, started with CAPVST_ALLOW_UNTRAINED=1): those outputs are not "
                  "stylizations")


def _print_summary(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(st), flush=True)
        return
    msg = (f"job {st['job']} {st['state']}: {st['succeeded']} succeeded, {st['skipped']} "
           f"skipped, {st['failed']} failed of {st['total']} items "
           f"in {st['elapsed_seconds']:.1f} s ({st['rate_per_second']:.2f} items/s)")
    info(msg)
    if st.get("errors"):
        info("failed by code: " + ", ".join(f"{k} {v}" for k, v in st["errors"].items()))
    if st.get("untrained"):
        info("WARNING: " + UNTRAINED_NOTE)
    if st.get("manifest_error"):
        info(f"manifest unusable: {st['manifest_error']}")
    if st.get("report_error"):
        info(f"the report could not be written: {st['report_error']}")
    elif st.get("valid") == 0:
        info("no line of the manifest is a valid item")
    if st.get("report"):
        info(f"report: {st['report']}")


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

    from .errors import CapvstError
    from .manifest import JobOptions
    from .storage import parse

    if args.style_weights is not None and len(args.style_weights) != len(args.styles or []):
        raise Fail(f"{len(args.style_weights)} --style-weights for {len(args.styles or [])} "
                   "--style", EXIT_USAGE)
    try:
        # a style on the command line is relative to here, not to the manifest
        styles = [parse(s).uri for s in args.styles] if args.styles else None
        options = JobOptions(mode=args.mode, max_size=args.max_size, tile=args.tile,
                             format=args.format, styles=styles, style_weights=args.style_weights,
                             png_level=args.png_level, jpeg_quality=args.jpeg_quality,
                             webp_quality=args.webp_quality)
    except CapvstError as exc:
        raise Fail(f"bad --style: {exc.message}", EXIT_USAGE) from None
    except ValidationError as exc:
        raise Fail(f"bad option: {exc.errors()[0]['msg']}", EXIT_USAGE) from None
    settings = load_settings()
    if any(u.startswith("s3://") for u in (args.manifest, args.output or "", *(styles or []))):
        check_s3_credentials(settings)
    client = _client(settings)
    _warn_outside_local_root(settings, args.manifest, args.output)
    try:
        rec = client.submit(args.manifest, args.output, options, args.manifest_format,
                            progress=info)
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


def _warn_outside_local_root(settings: Settings, manifest: str, output: str | None) -> None:
    """The scheduler and workers use local paths only under their CAPVST_LOCAL_ROOT; say so
    when this environment's would refuse a local manifest or output."""
    from .errors import CapvstError
    from .storage import Storage, parse

    local = [u for u in (manifest, output) if u and not u.startswith("s3://")]
    if output is None and not manifest.startswith("s3://"):
        try:
            local.append(os.path.dirname(parse(manifest).path))  # the default output's folder
        except CapvstError:
            pass  # submit says what is wrong with the manifest
    store = Storage(settings)
    for uri in local:
        try:
            store.check(uri)
        except CapvstError as exc:
            info(f"capvst: warning: {uri}: {exc.message}; the scheduler and workers refuse it "
                 "unless their CAPVST_LOCAL_ROOT contains it")
            return


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
    print(format_status(st))
    return 0


def format_status(st: dict[str, Any]) -> str:
    """``capvst status`` as text: counts, rate, and an ETA only once it means something."""
    total = st["total"] if st["total"] is not None else f"{st['expanded']} so far (expanding)"
    eta = f"{st['eta_seconds']:.0f} s" if st["eta_seconds"] is not None else "-"
    cancel = " (cancel requested)" if st["cancel_requested"] and st["state"] != "cancelled" \
        else ""
    rows = [("job", st["job"]), ("state", f"{st['state']}{cancel}"), ("items", total),
            ("succeeded", st["succeeded"]), ("skipped", st["skipped"]),
            ("failed", st["failed"])]
    if st.get("errors"):
        rows.append(("by code", ", ".join(f"{k} {v}" for k, v in st["errors"].items())))
    rows += [("queued", st["queued"]), ("rate", f"{st['rate_per_second']:.2f} items/s"),
             ("eta", eta)]
    if st.get("models"):
        rows.append(("models", ", ".join(f"{k} ({v} items)" for k, v in st["models"].items())))
    if st.get("untrained"):
        rows.append(("WARNING", UNTRAINED_NOTE))
    if st.get("manifest_error"):
        rows.append(("manifest", f"unusable: {st['manifest_error']}"))
    if st.get("report_error"):
        rows.append(("report", f"not written: {st['report_error']}"))
    if st.get("report"):
        rows.append(("report", st["report"]))
    return "\n".join(f"{k:<9} {v}" for k, v in rows)


def cmd_report(args: argparse.Namespace) -> int:
    """Where the report is and the failed items."""
    from scheduler.client import JobError

    try:
        client = _client()
        uri, failed = client.report(args.job, args.output)
        rows = list(failed)
        untrained = client.used_untrained(args.job, args.output)
    except JobError as exc:
        return _fail_job(exc)
    rows.sort(key=lambda r: r["line"])
    if args.json:
        print(json.dumps({"report": uri, "untrained": untrained, "failed": rows}))
        return 0
    print(f"report: {uri}")
    if untrained:
        print("WARNING: " + UNTRAINED_NOTE)
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

    client = _client()
    try:
        rec = client.resume(args.job, args.output, progress=info)
    except JobError as exc:
        if exc.exit_code == 0:
            info(str(exc))
            return EXIT_OK
        return _fail_job(exc)
    info(f"job {rec.id} resumed")
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
    os.execvp(sys.executable, [sys.executable, "-m", "celery", *argv])
    return 0  # not reached


CELERY_HELP = """\
Celery's options: any option not described above goes to `celery worker`
unchanged (e.g. --without-gossip --without-mingle, --pool, --max-tasks-per-child,
--autoscale), and so does everything after `--`. `capvst {name} -- --help`
prints Celery's own list.

It runs:
  celery -A {app} worker -Q {queue} -E --concurrency {c} --hostname {name_}@%h
    --loglevel INFO --prefetch-multiplier 1 [Celery's options]
"""

_COMMON_SETTINGS = """\
  CAPVST_BROKER_URL       the Redis broker and job state:
                          redis://[:PASSWORD@]HOST:PORT/DB, rediss://..., or
                          sentinel://H1:26379;sentinel://H2:26379
  CAPVST_SENTINEL_MASTER  the master's name, with a sentinel:// broker
  CAPVST_SENTINEL_PASSWORD  the sentinels' own password, if they require one
  CAPVST_S3_ENDPOINT_URL  an S3-compatible endpoint (unset: AWS); credentials
                          come the standard AWS ways
  CAPVST_LOCAL_ROOT       the only folder file:// URIs may use (unset: none)
  CAPVST_ALLOWED_BUCKETS  buckets items may touch (unset: any)
"""

WORKER_SETTINGS = """\
settings that matter (environment; every one is in README.md):
""" + _COMMON_SETTINGS + """\
  CAPVST_CHECKPOINT_PHOTOREALISTIC, CAPVST_CHECKPOINT_ARTISTIC
                          checkpoints (path, file:// or s3://); a worker
                          without one for a mode it serves refuses to start
  CAPVST_ALLOW_UNTRAINED  1: serve the seeded untrained network instead (a
                          demo; reports say untrained)
  CAPVST_CHECKPOINT_PHOTOREALISTIC_SHA256, CAPVST_CHECKPOINT_ARTISTIC_SHA256
                          refuse a checkpoint whose sha256 differs
  CAPVST_WORKER_MODES     modes this worker loads (default both)
  CAPVST_DEVICE           auto, cpu, cuda or cuda:N (default auto)
  CAPVST_TASK_TIME_LIMIT  hard limit of one task, seconds (default 1800)
  CAPVST_VISIBILITY_TIMEOUT  must exceed the time limit (default 3600)
  CAPVST_TORCH_THREADS    CPU threads per worker process
  CAPVST_METRICS_PORT     Prometheus /metrics on this port (unset: off)
"""

SCHEDULER_SETTINGS = """\
settings that matter (environment; every one is in README.md):
""" + _COMMON_SETTINGS + """\
  CAPVST_CHUNK_SIZE       items per stylize task (default 8)
  CAPVST_EXPAND_SLICE_LINES  manifest lines per expansion step (default 5000)
  CAPVST_MAX_QUEUED_TASKS  expansion pauses while the stylize queue is this
                          long (default 2000)
  CAPVST_JOB_TTL_DAYS     days a finished job stays in Redis (default 14)
  CAPVST_REPORT_ROWS      rows with thumbnails in index.html (default 100)
  CAPVST_METRICS_PORT     Prometheus /metrics on this port (unset: off)
"""


def _loglevel(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL"):
        raise argparse.ArgumentTypeError(f"not a log level: {text!r}")
    return level


def _concurrency(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _service(args: argparse.Namespace, queue: str, app: str) -> int:
    argv = ["-A", app, "worker", "-Q", queue, "-E", "--concurrency", str(args.concurrency),
            "--hostname", args.hostname, "--loglevel", args.loglevel,
            "--prefetch-multiplier", "1", *args.celery_args]
    return _celery(argv)


def cmd_worker(args: argparse.Namespace) -> int:
    """A stylize worker: one process (one per GPU), prefetch 1, late acks, events on."""
    return _service(args, "capvst.stylize", "worker")


def cmd_scheduler(args: argparse.Namespace) -> int:
    """The scheduler service: consumes capvst.schedule (expansion and reports)."""
    return _service(args, "capvst.schedule", "scheduler.app")


def _add_service(sub: Any, name: str, queue: str, concurrency: int, node: str, text: str,
                 description: str, settings: str, fn: Any) -> None:
    p = sub.add_parser(name, help=text, allow_abbrev=False, usage=(
        f"capvst {name} [-h] [-n NAME] [-c N] [-l LEVEL] [CELERY_OPTION ...] "
        "[-- CELERY_ARG ...]"), **parser_kwargs(
        description=description,
        epilog=CELERY_HELP.format(name=name, queue=queue, c=concurrency, name_=node,
                                  app="worker" if queue == "capvst.stylize"
                                  else "scheduler.app")
        + "\n" + settings))
    p.add_argument("-n", "--hostname", default=f"{node}@%h", metavar="NAME",
                   help=f"node name, as Flower and `celery inspect` show it (default "
                        f"{node}@%%h; %%h is the host name)")
    p.add_argument("-c", "--concurrency", type=_concurrency, default=concurrency, metavar="N",
                   help=f"worker processes (default {concurrency})")
    p.add_argument("-l", "--loglevel", type=_loglevel, default="INFO", metavar="LEVEL",
                   help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    p.set_defaults(func=fn, celery_args=[])


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
                       **parser_kwargs(description=SUBMIT_DESCRIPTION))
    _submit_args(p)

    p = sub.add_parser("status", help="counts per state, rate and ETA of a job",
                       **parser_kwargs(description="Counts per state (succeeded, skipped, "
                                       "failed, queued), rate and ETA of a job known to "
                                       "Redis."))
    p.add_argument("job", metavar="JOB", help=JOB_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="where a job's report is, and its failed items",
                       **parser_kwargs(description="Where a job's report is, and its failed "
                                       "items with line, error code and message. Works from "
                                       "the report file when Redis no longer knows the job "
                                       "(give --output)."))
    p.add_argument("job", metavar="JOB", help=JOB_HELP)
    p.add_argument("--output", metavar="PREFIX", help="the job's output prefix, when Redis no "
                   "longer knows the job")
    p.add_argument("--json", action="store_true", help=JSON_HELP + " ({report, untrained, "
                   "failed})")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cancel", help="stop a job (queued items fail with 'cancelled')",
                       **parser_kwargs(description="Stop a job: its queued items fail with "
                                       "'cancelled'; items already running finish. `capvst "
                                       "resume` undoes it."))
    p.add_argument("job", metavar="JOB", help=JOB_HELP)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="re-enqueue every item of a job that is not final",
                       **parser_kwargs(description="Re-enqueue every item of a job without a "
                                       "final result; also un-cancels a cancelled job. After "
                                       "Redis lost everything, --output tells where the job "
                                       "record is."))
    p.add_argument("job", metavar="JOB", help=JOB_HELP)
    p.add_argument("--output", metavar="PREFIX", help="the job's output prefix (needed when "
                   "Redis no longer knows the job)")
    p.add_argument("--wait", action="store_true",
                   help="wait until the job is final, then print the summary")
    p.set_defaults(func=cmd_resume)

    _add_service(sub, "worker", "capvst.stylize", 1, "stylize",
                 "run a stylize worker (Celery's options pass through)",
                 "Run a stylize worker on the queue capvst.stylize: it loads the models once, "
                 "takes one task at a time (prefetch 1), acknowledges a task only when it is "
                 "done, and sends events for Flower. Run one per GPU.",
                 WORKER_SETTINGS, cmd_worker)
    _add_service(sub, "scheduler", "capvst.schedule", 2, "scheduler",
                 "run the scheduler service (Celery's options pass through)",
                 "Run the scheduler service on the queue capvst.schedule: it expands "
                 "manifests into stylize tasks and writes each job's report when every item "
                 "is final. One or two are enough for a fleet.",
                 SCHEDULER_SETTINGS, cmd_scheduler)

    p = sub.add_parser("examples", help="copy the bundled example images and manifest",
                       **parser_kwargs(description="Copy the bundled example images and "
                                       "manifest.jsonl into FOLDER and print the manifest's "
                                       "path."))
    p.add_argument("folder", metavar="FOLDER", help="where to copy them (created if missing)")
    p.set_defaults(func=cmd_examples)


__all__ = ["add_commands", "submit_parser"]
