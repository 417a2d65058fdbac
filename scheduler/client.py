"""The job client behind ``capvst submit|status|report|cancel|resume``.

Submitting sends one small message (``capvst.expand`` for the first slice) after storing the
job record in Redis and in ``{output}/_capvst/{job}/job.json``; everything else is read from
Redis, or rebuilt from object storage when Redis lost it. The manifest is pinned at submit
(its version, ETag or size and modification time): a manifest overwritten while the job
runs fails the job with ``manifest_changed`` instead of shifting lines under results.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from capvst import UNTRAINED
from capvst.broker import TaskNames, create_app, sender
from capvst.errors import CapvstError, NotFound, TransientError
from capvst.jobs import RANK, Counts, JobRecord, JobStore, ManifestPin, connect_settings
from capvst.manifest import JobOptions, SubmitFormat
from capvst.manifest_formats import InventoryCounts, inventory_to_jsonl, sniff_format
from capvst.results import ItemResult, eta_seconds, job_started, throughput
from capvst.retry import with_retries
from capvst.settings import Settings
from capvst.storage import Storage, join, parse

from .report import job_folder, report_uri, results_folder

T = TypeVar("T")


class JobError(CapvstError):
    """A job-level problem for the command line (exit code in ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def new_job_id() -> str:
    """Sortable, unique, safe in keys and paths: ``20261126-163954-a1b2c3``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class Client:
    """Talks to Redis (job state, broker) and object storage for one user."""

    settings: Settings

    def __post_init__(self) -> None:
        s = self.settings
        self.storage = Storage(s, confine_local=False)
        self.jobs = JobStore(connect_settings(s, retry_seconds=10),
                             int(s.job_ttl_days * 86400), s.lease_seconds)
        self.app = create_app(s)
        self._sender = sender(self.app)

    def _retry(self, fn: Callable[[], T]) -> T:
        s = self.settings
        return with_retries(fn, s.task_max_retries + 1, s.retry_backoff, s.retry_backoff_max)

    def _read(self, uri: str) -> bytes:
        return self._retry(lambda: self.storage.read(uri))

    def _send(self, name: str, kwargs: dict[str, Any], argsrepr: str) -> None:
        self._sender(name, kwargs, argsrepr)

    # -- submit --------------------------------------------------------------------------------
    def submit(self, manifest: str, output: str | None = None,
               options: JobOptions | None = None, manifest_format: SubmitFormat | None = None,
               progress: Callable[[str], None] | None = None) -> JobRecord:
        """Create a job for ``manifest`` and queue its expansion.

        ``manifest_format`` None: told from the manifest itself. An S3 Inventory report is
        turned into ``{output}/_capvst/{job}/manifest.jsonl`` here, one line per listed image.
        """
        options = options or JobOptions()
        loc = parse(manifest)
        is_plain_path = "://" not in manifest
        try:
            size = self._retry(lambda: self.storage.size(manifest))
        except CapvstError as exc:
            raise JobError(f"manifest {manifest}: {exc.message}", 2) from None
        if size is None:
            raise JobError(f"manifest {manifest} does not exist", 2)
        try:
            fmt = manifest_format or self._retry(lambda: sniff_format(self.storage, manifest))
        except CapvstError as exc:
            raise JobError(f"manifest {manifest}: {exc.message}", 2) from None
        if fmt in ("s3-batch", "s3-inventory"):
            if not options.styles:
                kind = "an S3 Batch Operations" if fmt == "s3-batch" else "an S3 Inventory"
                raise JobError(f"{manifest} is {kind} manifest: it lists only the contents; "
                               "give the style(s) with --style URI", 2)
            options = options.model_copy(update={"output_layout": "keys"})
        job = new_job_id()
        base = loc.uri
        if output is None:
            stem = os.path.splitext(loc.name)[0] or "manifest"
            output = join(posixpath.dirname(loc.uri) if loc.scheme == "s3"
                          else os.path.dirname(loc.path), f"{stem}-output")
        output = parse(output).uri.rstrip("/")
        uri = loc.uri
        if fmt == "s3-inventory":
            uri = join(output, "_capvst", job, "manifest.jsonl")
            counts = self._convert_inventory(manifest, uri)
            (progress or (lambda _m: None))(f"inventory {manifest}: {counts.describe()}")
            if not counts.queued:
                raise JobError(f"the inventory {manifest} lists no image to stylize "
                               f"({counts.describe()})", 2)
            fmt = "jsonl"
        elif is_plain_path:
            # a local file is uploaded next to the outputs; relative URIs in it still resolve
            # against its original folder (recorded as the base)
            ext = os.path.splitext(loc.path)[1] or ".jsonl"
            uri = join(output, "_capvst", job, f"manifest{ext}")
            try:
                self._retry(lambda: self.storage.upload_file(uri, loc.path))
            except CapvstError as exc:
                raise JobError(f"cannot upload the manifest to {uri}: {exc.message}", 2) from None
        try:
            pin = self._retry(lambda: self.storage.pin(uri))
        except CapvstError as exc:
            raise JobError(f"manifest {uri}: {exc.message}", 2) from None
        if pin is None:
            raise JobError(f"manifest {uri} does not exist", 2)
        rec = JobRecord(id=job, manifest=uri, base=base, output=output, options=options,
                        format=fmt, created=time.time(), pin=ManifestPin(**pin))
        try:
            self._retry(lambda: self.storage.write(
                join(job_folder(rec), "job.json"), rec.model_dump_json(indent=2).encode(),
                content_type="application/json"))
        except TransientError as exc:
            raise JobError(f"cannot write to {output}: {exc.message}", 1) from None
        except CapvstError as exc:
            raise JobError(f"output prefix {output} is not writable: {exc.message}", 2) from None
        self.jobs.create(rec)
        self._send(TaskNames.EXPAND.value, dict(job=job, epoch=0, offset=0, line=1),
                   f"job={job} line=1")
        return rec

    def _convert_inventory(self, manifest: str, uri: str) -> InventoryCounts:
        """Stream the inventory's data files into a JSON Lines manifest stored at ``uri``."""
        fd, path = tempfile.mkstemp(prefix="capvst-inventory-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                try:
                    counts = inventory_to_jsonl(self.storage, manifest, fh)
                except CapvstError as exc:
                    raise JobError(f"inventory {manifest}: {exc.message}", 2) from None
            try:
                self._retry(lambda: self.storage.upload_file(uri, path, "application/x-ndjson"))
            except CapvstError as exc:
                raise JobError(f"cannot write the manifest to {uri}: {exc.message}", 2) \
                    from None
        finally:
            os.unlink(path)
        return counts

    # -- inspect -------------------------------------------------------------------------------
    def record(self, job: str, output: str | None = None) -> JobRecord:
        """The job's definition from Redis, else from ``{output}/_capvst/{job}/job.json``."""
        rec = self.jobs.record_of(job)
        if rec is not None:
            return rec
        if not output:
            raise JobError(f"job {job} is not in Redis (unknown, expired or lost); pass "
                           "--output PREFIX to read it from object storage")
        uri = join(output, "_capvst", job, "job.json")
        try:
            return JobRecord.model_validate_json(self._retry(lambda: self.storage.read(uri)))
        except NotFound:
            raise JobError(f"no job {job} under {output} ({uri} does not exist)") from None

    def counts(self, job: str) -> Counts:
        """Progress of a job known to Redis."""
        c = self.jobs.counts(job)
        if c is None:
            raise JobError(f"job {job} is not in Redis (unknown, expired or lost); "
                           f"`capvst resume {job} --output PREFIX` rebuilds it")
        return c

    def status(self, job: str) -> dict[str, Any]:
        """Counts, rate and ETA as a dict (the rate as ``summary.json`` computes it)."""
        c = self.counts(job)
        f = self.jobs.fields(job)
        final = c.state in ("done", "cancelled")
        started = job_started(c.started, c.created)
        now = c.finished if final and c.finished else time.time()
        rate = throughput(c.done, started, c.finished if final else None)
        total = c.total if c.total is not None else c.expanded_items
        models = _json_field(f.get("models")) or {}
        # set by the first result of the untrained network, then by the report
        untrained = f.get("untrained") == "1" or UNTRAINED in models
        return {"job": job, "state": c.state,
                "total": c.total, "expanded": c.expanded_items, "succeeded": c.succeeded,
                "skipped": c.skipped, "failed": c.failed, "done": c.done,
                "queued": max(0, total - c.done), "cancel_requested": c.cancelled,
                "rate_per_second": rate,
                "eta_seconds": eta_seconds(c.done, c.total, rate, final),
                "elapsed_seconds": round(max(0.0, now - started), 1),
                "untrained": untrained, "models": models,
                "errors": _json_field(f.get("summary_errors")),
                "manifest_error": f.get("manifest_error"), "valid": c.valid,
                "report": f.get("report"), "report_error": f.get("report_error")}

    def used_untrained(self, job: str, output: str | None = None) -> bool:
        """Whether the untrained network computed any item of the job (from Redis, else from
        the job's ``summary.json``)."""
        f = self.jobs.fields(job)
        if f:
            return f.get("untrained") == "1" or UNTRAINED in (_json_field(f.get("models"))
                                                               or {})
        try:
            data = self._read(join(job_folder(self.record(job, output)), "summary.json"))
            return bool(json.loads(data).get("untrained"))
        except (CapvstError, ValueError):
            return False

    def report(self, job: str, output: str | None = None) -> tuple[str, Iterator[dict[str, Any]]]:
        """The report's URI and the failed items (from the report once written, else from
        the results stored so far)."""
        rec = self.record(job, output)
        uri = report_uri(rec)
        c = self.jobs.counts(job)
        finished = c is None or c.state in ("done", "cancelled")

        def from_report() -> Iterator[dict[str, Any]]:
            data = self._retry(lambda: self.storage.read(uri))
            for line in data.decode().splitlines():
                r = json.loads(line)
                if r.get("status") == "failed":
                    yield r

        def so_far() -> Iterator[dict[str, Any]]:
            best: dict[int, ItemResult] = {}
            for r in self._stored(rec, include_inbox=True):
                if r.line not in best or r.better_than(best[r.line]):
                    best[r.line] = r
            for r in best.values():
                if r.status == "failed":
                    yield r.report_line()

        return uri, from_report() if finished else so_far()

    # -- control -------------------------------------------------------------------------------
    def cancel(self, job: str) -> None:
        """Stop a job: queued items fail with ``cancelled``, running ones finish."""
        c = self.counts(job)
        if c.state in ("done", "cancelled"):
            raise JobError(f"job {job} already finished ({c.state})")
        self.jobs.request_cancel(job)

    def resume(self, job: str, output: str | None = None,
               progress: Callable[[str], None] | None = None) -> JobRecord:
        """Re-enqueue every item of the job that has no final result; also un-cancels.

        Works after Redis lost everything: the job record comes from ``job.json`` and the
        results from the job's result files; the manifest is expanded again and items
        already final are not queued.
        """
        say = progress or (lambda _m: None)
        rec = self.jobs.record_of(job)
        c = self.jobs.counts(job)
        if rec is None or c is None:
            rec = self.record(job, output)
            if self._finished_in_storage(rec):
                raise JobError(f"job {job} already finished (its report is in "
                               f"{job_folder(rec)}); nothing to resume", 0)
            self.jobs.create(rec)
            n = self._rebuild(rec)
            say(f"job {job} rebuilt from {join(job_folder(rec), 'job.json')}"
                + f" with {n} stored results")
        elif c.state in ("done", "cancelled"):
            if not c.cancelled:
                raise JobError(f"job {job} already finished; nothing to resume", 0)
            # a finished job keeps no per-line state: rebuild it, without the cancellations
            # out of the finished states first: a result recorded into a finished job is a
            # late result kept for a re-finalize, not per-line state
            self.jobs.r.hdel(self.jobs.key(job), "cancelled", "expanded", "finalize_due")
            self.jobs.r.hset(self.jobs.key(job), mapping={
                "n_succeeded": 0, "n_failed": 0, "n_skipped": 0, "state": "queued"})
            n = self._rebuild(rec)
            say(f"recovered {n} results from object storage")
        elif c.cancelled:
            max_line = int(self.jobs.fields(job).get("max_line") or 0) or self._max_line(rec)
            n = self.jobs.uncancel(job, max_line)
            say(f"{n} cancelled items queued again")
        epoch = self.jobs.reset_for_resume(job)
        self._send(TaskNames.EXPAND.value, dict(job=job, epoch=epoch, offset=0, line=1),
                   f"job={job} line=1 (resume)")
        return rec

    def _max_line(self, rec: JobRecord) -> int:
        """Highest manifest line with a result (when the expansion never reached the end)."""
        return max((r.line for r in self._stored(rec, include_inbox=True)), default=0) + 1

    def _finished_in_storage(self, rec: JobRecord) -> bool:
        try:
            data = self._read(join(job_folder(rec), "summary.json"))
        except NotFound:
            return False
        try:
            return json.loads(data).get("state") == "done"
        except ValueError:
            return False

    def _rebuild(self, rec: JobRecord) -> int:
        """Per-line state from the stored results, cancellations excepted (only each line's
        number, status and code are read: a million results in seconds)."""
        def usable() -> Iterator[tuple[int, str, str | None, bool]]:
            for d in self._stored_raw(rec):
                line, status, error = d.get("line"), d.get("status"), d.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                if (not isinstance(line, int) or line < 1 or status not in RANK
                        or (status == "failed" and code == "cancelled")):
                    continue
                yield line, status, code, d.get("model") == UNTRAINED

        return self.jobs.import_states(rec.id, usable())

    def _stored_raw(self, rec: JobRecord) -> Iterator[dict[str, Any]]:
        """The records in the job's result files, as parsed JSON (read in parallel)."""
        try:
            uris = [u for u in self._retry(lambda: list(self.storage.iter_uris(
                results_folder(rec)))) if u.endswith(".jsonl")]
        except CapvstError:
            uris = []
        with ThreadPoolExecutor(max_workers=16) as pool:
            for data in pool.map(self._read, uris):
                for line in data.splitlines():
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(d, dict):
                        yield d

    def _stored(self, rec: JobRecord, include_inbox: bool = False) -> Iterator[ItemResult]:
        """Results in the job's result files, then Redis's inbox."""
        for d in self._stored_raw(rec):
            try:
                yield ItemResult.model_validate(d)
            except ValueError:
                continue
        if include_inbox:
            for text in self.jobs.inbox_peek(rec.id, 1_000_000):
                yield ItemResult.from_json(text)

    # -- wait ----------------------------------------------------------------------------------
    def wait(self, job: str, progress: str = "bar", poll: float = 0.2,
             line_every: float = 10.0) -> dict[str, Any]:
        """Block until the job is final. ``progress``: ``bar`` (a live bar on stderr),
        ``lines`` (a plain progress line on stderr every ``line_every`` seconds, for logs) or
        ``none``."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=sys.stderr)
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
        last_line = 0.0
        with Progress(*columns, console=console, disable=progress != "bar",
                      transient=False) as bar:
            task = bar.add_task(job, total=None, detail="")
            while True:
                st = self.status(job)
                detail = _progress_detail(st)
                bar.update(task, completed=st["done"], total=st["total"], detail=detail,
                           description=f"{job} {st['state']}")
                final = st["state"] in ("done", "cancelled")
                now = time.monotonic()
                if progress == "lines" and (final or now - last_line >= line_every):
                    print(progress_line(st), file=sys.stderr, flush=True)
                    last_line = now
                if final:
                    return st
                time.sleep(poll)


def _json_field(raw: str | None) -> Any:
    """A JSON value kept in the job hash (a finished job's summary), or None."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _progress_detail(st: dict[str, Any]) -> str:
    """Failures, rate and (once it means something) ETA; the untrained network named."""
    parts = [f"{st['failed']} failed", f"{st['skipped']} skipped"]
    if st["done"]:
        parts.append(f"{st['rate_per_second']:.2f} items/s")
    if st["eta_seconds"] is not None:
        parts.append(f"ETA {st['eta_seconds']:.0f} s")
    if st["total"] is None:
        parts.append(f"expanding the manifest: {st['expanded']} items so far")
    if st.get("untrained"):
        parts.append("UNTRAINED model")
    return ", ".join(parts)


def progress_line(st: dict[str, Any]) -> str:
    """One plain progress line: ``done/total`` once the total is known, else ``done`` alone
    (a count of items found so far is no denominator)."""
    done = f"{st['done']}/{st['total']}" if st["total"] is not None else f"{st['done']}"
    return f"{st['job']} {st['state']}: {done} done ({_progress_detail(st)})"


def exit_code_for(st: dict[str, Any]) -> int:
    """0 all good; 3 finished with failed items; 2 the manifest as a whole was unusable."""
    if st.get("manifest_error") or not st.get("valid"):
        return 2
    return 3 if st.get("failed") else 0


__all__ = ["Client", "JobError", "exit_code_for", "new_job_id", "progress_line"]

