"""Expand a job's manifest into stylize tasks, slice by slice, and finalise finished jobs.

Plain functions over a :class:`Context`; the Celery tasks in :mod:`worker.tasks` only wrap
them. Expansion reads ``slice_lines`` physical lines from a byte offset, then schedules the
next slice, so a manifest of any size streams with bounded memory, a crash costs at most one
slice of repeated (idempotent) work, and the scheduler stays responsive to other jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from capvst import manifest as mf
from capvst.errors import CapvstError, DuplicateOutput, PermanentError
from capvst.jobs import JobRecord, JobStore
from capvst.settings import Settings
from capvst.storage import Storage

log = logging.getLogger(__name__)


class Sender(Protocol):
    """Publishes a task: (name, kwargs, argsrepr, countdown)."""

    def __call__(self, name: str, kwargs: dict[str, Any], argsrepr: str,
                 countdown: float | None = None) -> None: ...


@dataclass
class Context:
    """What the scheduler needs, built once per process."""

    settings: Settings
    storage: Storage
    jobs: JobStore
    send: Sender
    queue_length: Callable[[], int]


def failed_result(err: mf.ItemError | mf.Item, code: str, message: str) -> dict[str, Any]:
    """A report record for an item that never reached a worker."""
    style = err.style_field if isinstance(err, mf.Item) else err.style
    return {"line": err.line, "id": err.id, "content": err.content, "style": style,
            "output": err.output, "status": "failed",
            "error": {"code": code, "message": message}, "attempts": 0, "seconds": 0.0,
            "worker": None, "model": None}


def _argsrepr(job: str, items: list[mf.Item]) -> str:
    lines = [i.line for i in items]
    span = f"{lines[0]}" if len(lines) == 1 else f"{min(lines)}..{max(lines)}"
    return f"job={job} lines={span} items={len(items)}"


def expand_slice(ctx: Context, job: str, epoch: int, offset: int, line: int) -> str:
    """Expand one slice of ``job``'s manifest starting at byte ``offset`` / line ``line``.

    Returns what happened (for logs and tests): ``stale``, ``throttled``, ``next``, ``done``.
    """
    jobs = ctx.jobs
    fields = jobs.fields(job)
    rec = jobs.record_of(job)
    if rec is None or not fields:
        log.warning("expand: job %s is unknown (expired or lost); use capvst resume", job)
        return "stale"
    if int(fields.get("epoch", 0)) != epoch or int(fields.get("cursor_offset", -1)) != offset:
        return "stale"
    cancelled = fields.get("cancelled") == "1"
    if not cancelled and ctx.queue_length() >= ctx.settings.max_queued_tasks:
        ctx.send("capvst.expand", dict(job=job, epoch=epoch, offset=offset, line=line),
                 f"job={job} line={line} (waiting for queue room)", countdown=2.0)
        return "throttled"
    if fields.get("state") == "queued":
        jobs.set(job, state="running")
    jobs.set_if_absent(job, "started", time.time())

    items: list[mf.Item] = []
    errors: list[tuple[mf.ItemError | mf.Item, str, str]] = []
    header = fields.get("csv_header")
    fmt: mf.ManifestFormat | None = rec.format or fields.get("format")  # type: ignore[assignment]
    next_offset, next_line, eof, n_lines = offset, line, True, 0
    try:
        chunks = ctx.storage.iter_chunks(rec.manifest, offset)
        for raw in mf.iter_physical_lines(chunks, start=offset, first_line=line):
            next_offset, next_line = raw.end, raw.number + 1
            n_lines += 1
            if raw.text is not None and not raw.text.strip():
                pass  # blank lines make no item
            elif fmt is None and raw.text is not None:
                fmt = mf.detect_format(rec.manifest, raw.text)
                jobs.set(job, format=fmt)
            if raw.text is None:
                errors.append((mf.ItemError(raw.number, "invalid_item", raw.problem or "bad line"),
                               "invalid_item", raw.problem or "bad line"))
            elif raw.text.strip():
                if fmt == "csv" and header is None:
                    cols = mf.parse_csv_header(raw.text)
                    header = ",".join(cols)
                    jobs.set(job, csv_header=header)
                else:
                    _one_line(raw.number, raw.text, fmt or "jsonl",
                              header.split(",") if header else None, rec, items, errors)
            if n_lines >= ctx.settings.expand_slice_lines:
                eof = False
                break
    except PermanentError as exc:
        if offset == 0 and n_lines == 0:
            jobs.set(job, manifest_error=f"{exc.code}: {exc.message}")
            log.error("job %s: manifest unusable: %s", job, exc.message)
        else:
            jobs.set(job, manifest_error=f"{exc.code}: {exc.message} (after line {next_line - 1})")
        eof = True
    _dedupe_outputs(jobs, job, items, errors)
    # counted before anything is filtered: on a resume most items are already final
    n_items, n_valid = len(items) + len(errors), len(items)
    if items:
        done = jobs.final_lines(job, [i.line for i in items])
        items = [i for i, d in zip(items, done) if not d]
    if cancelled:
        errors += [(i, "cancelled", "the job was cancelled") for i in items]
        items = []
    for err, code, message in errors:
        jobs.record(job, failed_result(err, code, message))
    _enqueue(ctx, job, items)
    due = jobs.advance(job, epoch, offset, next_offset, next_line, eof, n_items, n_valid)
    if due < 0:
        return "stale"
    if due:
        ctx.send("capvst.finalize", dict(job=job), f"job={job}")
    if not eof:
        ctx.send("capvst.expand", dict(job=job, epoch=epoch, offset=next_offset,
                                       line=next_line), f"job={job} line={next_line}")
        return "next"
    return "done"


def _one_line(number: int, text: str, fmt: mf.ManifestFormat, header: list[str] | None,
              rec: JobRecord, items: list[mf.Item],
              errors: list[tuple[mf.ItemError | mf.Item, str, str]]) -> None:
    raw: dict[str, Any] | None = None
    try:
        raw = mf.parse_line(text, fmt, header)
        items.append(mf.build_item(raw, number, rec.base, rec.output, rec.options))
    except CapvstError as exc:
        err = mf.item_error(raw, number, exc)
        errors.append((err, exc.code, exc.message))


def _dedupe_outputs(jobs: JobStore, job: str, items: list[mf.Item],
                    errors: list[tuple[mf.ItemError | mf.Item, str, str]]) -> None:
    owners = jobs.claim_outputs(job, [(i.output, i.line) for i in items])
    keep = []
    for item, owner in zip(items, owners):
        if owner == item.line:
            keep.append(item)
        else:
            exc = DuplicateOutput(f"output {item.output} is already written by line {owner}")
            errors.append((item, exc.code, exc.message))
    items[:] = keep


def _enqueue(ctx: Context, job: str, items: list[mf.Item]) -> None:
    # items sharing a style travel together so a worker computes its statistics once
    items.sort(key=lambda i: (i.style_key, i.line))
    size = ctx.settings.chunk_size
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        ctx.send("capvst.stylize", dict(job=job, items=[i.model_dump() for i in chunk]),
                 _argsrepr(job, chunk))


def finalize_job(ctx: Context, job: str) -> str:
    """Write the report of a job whose items are all final; returns its final state."""
    from .report import write_report

    rec = ctx.jobs.record_of(job)
    if rec is None:
        log.warning("finalize: job %s is unknown", job)
        return "unknown"
    ctx.jobs.set(job, state="finalizing")
    summary = write_report(ctx.storage, ctx.jobs, rec, ctx.jobs.fields(job),
                           ctx.settings.report_rows)
    ctx.jobs.set(job, state=summary["state"], finished=summary["finished"],
                 report=summary["report"])
    ctx.jobs.expire(job)
    log.info("job %s %s: %s succeeded, %s skipped, %s failed", job, summary["state"],
             summary["succeeded"], summary["skipped"], summary["failed"])
    return str(summary["state"])
