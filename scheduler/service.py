"""Expand a job's manifest into stylize tasks, slice by slice; store results; finalise.

Plain functions over a :class:`Context`; the Celery tasks in :mod:`scheduler.tasks` only
wrap them. A step commits its state and then sends the next step's message; a process death
or a failed publish in between is repaired by the reconciler (:mod:`scheduler.reconciler`),
which re-sends any step whose lease ran out. Steps are idempotent: an expansion slice is a
compare-and-set on (epoch, offset), finalize rebuilds the same report from the same results.
No exception, message or input line stops a job: a line that cannot become an item is a
failure record for that line; a manifest that cannot be read any further ends the expansion
with ``manifest_error``; anything else is retried.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capvst import manifest as mf
from capvst.broker import Sender, TaskNames
from capvst.errors import CapvstError, DuplicateOutput, PermanentError, TransientError
from capvst.jobs import JobRecord, JobStore
from capvst.metrics import SchedulerMetrics
from capvst.results import ItemResult
from capvst.retry import with_retries
from capvst.settings import Settings
from capvst.storage import Storage, join

from .report import (
    iter_stored_results,
    merge_in_line_order,
    report_uri,
    results_folder,
    write_report,
)

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What the scheduler needs, built once per process."""

    settings: Settings
    storage: Storage
    jobs: JobStore
    send: Sender
    queue_length: Callable[[], int]
    metrics: SchedulerMetrics = field(default_factory=lambda: SchedulerMetrics(False))


def _argsrepr(job: str, items: list[mf.Item]) -> str:
    lines = [i.line for i in items]
    span = f"{lines[0]}" if len(lines) == 1 else f"{min(lines)}..{max(lines)}"
    return f"job={job} lines={span} items={len(items)}"


def send_expand(ctx: Context, job: str, epoch: int, offset: int, line: int, why: str = ""
                ) -> None:
    """Queue the expansion step at (epoch, offset)."""
    ctx.send(TaskNames.EXPAND.value, dict(job=job, epoch=epoch, offset=offset, line=line),
             f"job={job} line={line}" + (f" ({why})" if why else ""))


def send_finalize(ctx: Context, job: str, why: str = "") -> None:
    """Queue the finalize step."""
    ctx.send(TaskNames.FINALIZE.value, dict(job=job), f"job={job}" + (f" ({why})" if why
                                                                         else ""))


# --- expansion -------------------------------------------------------------------------------

def expand_slice(ctx: Context, job: str, epoch: int, offset: int, line: int) -> str:
    """Expand one slice of ``job``'s manifest starting at byte ``offset`` / line ``line``.

    Returns what happened (for logs and tests): ``stale``, ``busy``, ``throttled``,
    ``next``, ``done``.
    """
    jobs = ctx.jobs
    lock, token = jobs.key(job, "lock:expand"), secrets.token_hex(8)
    if not jobs.hold(lock, token, ctx.settings.lease_seconds):
        return "busy"  # the same step runs elsewhere; if that one dies, the lease repairs it
    try:
        outcome, next_step = _expand(ctx, job, epoch, offset, line)
    finally:
        jobs.release(lock, token)
    # sent after the commit and after the lock is free, so the next step can start at once;
    # if this process dies first, the reconciler re-sends the step from the cursor
    if next_step == "finalize":
        send_finalize(ctx, job)
    elif next_step is not None:
        n_off, n_line = next_step
        send_expand(ctx, job, epoch, n_off, n_line)
    return outcome


def _expand(ctx: Context, job: str, epoch: int, offset: int, line: int
            ) -> tuple[str, Any]:
    jobs, s = ctx.jobs, ctx.settings
    fields = jobs.fields(job)
    rec = jobs.record_of(job)
    if rec is None or not fields:
        log.warning("expand: job %s is unknown (expired or lost); use capvst resume", job)
        return "stale", None
    if int(fields.get("epoch", 0)) != epoch or int(fields.get("cursor_offset", -1)) != offset \
            or fields.get("expanded") == "1":
        return "stale", None
    cancelled = fields.get("cancelled") is not None
    if not cancelled and ctx.queue_length() >= s.max_queued_tasks:
        # the reconciler sends this step again once the lease is over (a few seconds)
        jobs.touch_expansion(job, s.throttle_seconds)
        return "throttled", None
    if fields.get("state") == "queued":
        jobs.set(job, state="running")
    jobs.set_if_absent(job, "started", time.time())

    def read() -> tuple[list[mf.Item], list[ItemResult], int, int, bool, int, str | None]:
        return _read_slice(ctx, rec, fields, offset, line)

    items, failures, next_offset, next_line, eof, n_lines, manifest_error = with_retries(
        read, s.task_max_retries + 1, s.retry_backoff, s.retry_backoff_max)
    if manifest_error:
        jobs.set(job, manifest_error=manifest_error)
    _dedupe_outputs(jobs, job, items, failures)
    # counted before anything is filtered: on a resume most items are already final
    n_items, n_valid = len(items) + len(failures), len(items)
    if items:
        done = jobs.final_lines(job, [i.line for i in items])
        items = [i for i, d in zip(items, done) if not d]
    if cancelled:
        failures += [ItemResult.of_error(i, "cancelled", "the job was cancelled")
                     for i in items]
        items = []
    _enqueue(ctx, job, items)
    due = jobs.advance(job, epoch, offset, next_offset, next_line, eof, n_items, n_valid,
                       failures)
    if due < 0:
        return "stale", None
    ctx.metrics.expanded(n_items)  # committed (a stale step changed nothing)
    if due:
        return ("done" if eof else "next"), "finalize"
    if not eof:
        return "next", (next_offset, next_line)
    return "done", None


def _read_slice(ctx: Context, rec: JobRecord, fields: dict[str, str], offset: int, line: int
                ) -> tuple[list[mf.Item], list[ItemResult], int, int, bool, int, str | None]:
    """Parse up to ``expand_slice_lines`` physical lines from ``offset``."""
    jobs, s = ctx.jobs, ctx.settings
    items: list[mf.Item] = []
    failures: list[ItemResult] = []
    header = fields.get("csv_header")
    fmt: mf.ManifestFormat | None = rec.format or fields.get("format")  # type: ignore[assignment]
    next_offset, next_line, eof, n_lines = offset, line, True, 0
    manifest_error: str | None = None
    pin = rec.pin.model_dump() if rec.pin is not None else None
    try:
        chunks = ctx.storage.iter_chunks(rec.manifest, offset, pin=pin)
        for raw in mf.iter_physical_lines(chunks, start=offset, first_line=line):
            next_offset, next_line = raw.end, raw.number + 1
            n_lines += 1
            if raw.text is None:
                failures.append(ItemResult.of_error(
                    mf.ItemError(raw.number, "invalid_item", raw.problem or "bad line"),
                    "invalid_item", raw.problem or "bad line"))
            elif raw.text.strip():
                if fmt is None:
                    fmt = mf.detect_format(rec.manifest, raw.text)
                    jobs.set(rec.id, format=fmt)
                if fmt == "csv" and header is None:
                    header = ",".join(mf.parse_csv_header(raw.text))
                    jobs.set(rec.id, csv_header=header)
                else:
                    _one_line(raw.number, raw.text, fmt, header.split(",")
                              if header is not None else None, rec, items, failures)
            if n_lines >= s.expand_slice_lines:
                eof = False
                break
    except TransientError:
        raise
    except PermanentError as exc:
        where = "" if offset == 0 and n_lines == 0 else f" (after line {next_line - 1})"
        manifest_error = f"{exc.code}: {exc.message}{where}"
        log.error("job %s: manifest unusable%s: %s", rec.id, where, exc.message)
        eof = True
    return items, failures, next_offset, next_line, eof, n_lines, manifest_error


def _one_line(number: int, text: str, fmt: mf.ManifestFormat, header: list[str] | None,
              rec: JobRecord, items: list[mf.Item], failures: list[ItemResult]) -> None:
    raw: dict[str, Any] | None = None
    try:
        raw = mf.parse_line(text, fmt, header)
        items.append(mf.build_item(raw, number, rec.base, rec.output, rec.options))
    except CapvstError as exc:
        failures.append(ItemResult.of_error(mf.item_error(raw, number, exc), exc.code,
                                            exc.message))
    except Exception as exc:  # any parser or validator surprise fails this line alone
        log.warning("job %s line %d: %s", rec.id, number, exc, exc_info=True)
        err = mf.ItemError(number, "invalid_item", f"unusable line ({type(exc).__name__})")
        failures.append(ItemResult.of_error(err, "invalid_item", err.message))


def _dedupe_outputs(jobs: JobStore, job: str, items: list[mf.Item],
                    failures: list[ItemResult]) -> None:
    owners = jobs.claim_outputs(job, [(i.output, i.line) for i in items])
    keep = []
    for item, owner in zip(items, owners):
        if owner == item.line:
            keep.append(item)
        else:
            exc = DuplicateOutput(f"output {item.output} is already written by line {owner}")
            failures.append(ItemResult.of_error(item, exc.code, exc.message))
    items[:] = keep


def _enqueue(ctx: Context, job: str, items: list[mf.Item]) -> None:
    # a video item is a task of its own that plans its segments (worker/video.py)
    for item in [i for i in items if i.video]:
        ctx.send(TaskNames.VIDEO_PLAN.value, dict(job=job, item=item.model_dump()),
                 f"job={job} line={item.line} (video)")
    items = [i for i in items if not i.video]
    # items sharing a style travel together (and form batches on the device), so a worker
    # computes each style's statistics once; the report is in line order regardless
    items.sort(key=lambda i: (i.style_key, i.line))
    size = ctx.settings.chunk_size
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        ctx.send(TaskNames.STYLIZE.value,
                 dict(job=job, items=[i.model_dump() for i in chunk]), _argsrepr(job, chunk))


# --- results ---------------------------------------------------------------------------------

def drain_inbox(ctx: Context, rec: JobRecord, batch: int = 5000) -> int:
    """Copy results from Redis to the job's result files; returns how many were stored.

    A copy is written before it is removed from Redis: a crash in between stores some
    results twice, which the report's merge absorbs.
    """
    jobs, total = ctx.jobs, 0
    while True:
        raw = jobs.inbox_peek(rec.id, batch)
        if not raw:
            return total
        uri = join(results_folder(rec), f"{time.time_ns():020d}-{secrets.token_hex(3)}.jsonl")
        body = "".join(r + "\n" for r in raw).encode()

        def store(uri: str = uri, body: bytes = body) -> bool:
            return ctx.storage.write(uri, body, content_type="application/x-ndjson")

        with_retries(store, ctx.settings.task_max_retries + 1, ctx.settings.retry_backoff,
                     ctx.settings.retry_backoff_max)
        jobs.inbox_drop(rec.id, len(raw))
        total += len(raw)


# --- finalize --------------------------------------------------------------------------------

def finalize_job(ctx: Context, job: str) -> str:
    """Write the report of a job whose items are all final; returns its final state."""
    jobs = ctx.jobs
    lock, token = jobs.key(job, "lock:finalize"), secrets.token_hex(8)
    if not jobs.hold(lock, token, ctx.settings.lease_seconds * 10):
        return "busy"
    try:
        for _attempt in range(20):
            state = _finalize_once(ctx, job)
            if state != "again":
                return state
        return "again"  # results keep arriving; the reconciler comes back
    finally:
        jobs.release(lock, token)


def _finalize_once(ctx: Context, job: str) -> str:
    jobs = ctx.jobs
    rec = jobs.record_of(job)
    fields = jobs.fields(job)
    if rec is None or not fields:
        log.warning("finalize: job %s is unknown", job)
        return "unknown"
    state = fields.get("state")
    late = jobs.late_results(job) if state in ("done", "cancelled") else []
    if state in ("done", "cancelled") and fields.get("refinalize") != "1":
        return state
    if state not in ("done", "cancelled") and fields.get("finalize_due") != "1":
        return "not-due"
    jobs.set(job, finalize_at=time.time() + ctx.settings.lease_seconds * 10)
    try:
        drain_inbox(ctx, rec)
        results = iter_stored_results(ctx.storage, rec)
        if late:  # a result that changed after the report: rebuild from everything stored
            extra = [ItemResult.from_json(x) for x in late]
            results = _chain(results, extra)
        summary = write_report(ctx.storage, rec, fields, merge_in_line_order(results),
                               ctx.settings.report_rows)
    except PermanentError as exc:
        # the output prefix refuses the report (e.g. a local folder outside this
        # scheduler's CAPVST_LOCAL_ROOT): the job still ends, with the reason
        log.error("job %s: cannot write its report: %s", job, exc.message)
        return _finish_without_report(ctx, rec, fields, f"{exc.code}: {exc.message}")
    final = str(summary["state"])
    keep = {"state": final, "finished": summary["finished"], "report": summary["report"],
            "n_succeeded": summary["succeeded"], "n_failed": summary["failed"],
            "n_skipped": summary["skipped"], "total": summary["items"],
            "expanded_items": summary["items"], "started": summary["started"],
            "summary_errors": summary["errors"], "models": summary["models"],
            "untrained": int(summary["untrained"])}
    if late:
        _store_late(ctx, rec, late)
    if not jobs.finish(job, keep, late_consumed=len(late)):
        return "again"
    log.info("job %s %s: %s succeeded, %s skipped, %s failed", job, final,
             summary["succeeded"], summary["skipped"], summary["failed"])
    return final


def _finish_without_report(ctx: Context, rec: JobRecord, fields: dict[str, str],
                           why: str) -> str:
    """End a job whose report cannot be written: its counts stay in Redis with the reason."""
    final = "cancelled" if fields.get("cancelled") else "done"
    keep = {"state": final, "finished": time.time(), "report_error": why,
            "expanded_items": fields.get("total") or 0}
    ctx.jobs.inbox_drop(rec.id, ctx.jobs.inbox_length(rec.id))
    if not ctx.jobs.finish(rec.id, keep, late_consumed=len(ctx.jobs.late_results(rec.id))):
        return "again"
    return final


def _chain(a: Any, b: list[ItemResult]) -> Any:
    yield from a
    yield from b


def _store_late(ctx: Context, rec: JobRecord, late: list[str]) -> None:
    name = f"{time.time_ns():020d}-late-{secrets.token_hex(3)}.jsonl"
    ctx.storage.write(join(results_folder(rec), name), "".join(x + "\n" for x in late).encode(),
                      content_type="application/x-ndjson")


__all__ = ["Context", "drain_inbox", "expand_slice", "finalize_job", "report_uri",
           "send_expand", "send_finalize"]
