"""What a stylize worker does with a chunk of items: plain functions, no Celery.

For each item: skip it if a result is already recorded (a duplicate delivery) or its output
exists (``skipped``); otherwise fetch, stylize, encode and write the output create-only, retry
transient faults with backoff, and record exactly one result. An item that keeps killing its
worker is failed after ``max_deliveries`` starts.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from capvst import images
from capvst.errors import CapvstError, PermanentError, TransientError
from capvst.jobs import JobStore
from capvst.manifest import Item
from capvst.model.checkpoint import LoadedModel
from capvst.retry import backoff_delay
from capvst.settings import Settings
from capvst.storage import Storage, join
from capvst.stylize import Stylizer
from capvst.types import Mode

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """Per-process resources: settings, storage, job store and the loaded models."""

    settings: Settings
    storage: Storage
    jobs: JobStore
    models: dict[Mode, LoadedModel]
    name: str = field(default_factory=socket.gethostname)
    _stylizers: dict[Mode, Stylizer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stylizer(self, mode: Mode) -> Stylizer:
        """The model of ``mode`` on this process's device, built on first use."""
        with self._lock:
            if mode not in self._stylizers:
                if mode not in self.models:
                    from capvst.errors import ModelError

                    raise ModelError(f"this worker does not serve mode {mode!r} "
                                     "(CAPVST_WORKER_MODES)")
                dtype = torch.float64 if self.settings.transform_dtype == "float64" \
                    else torch.float32
                self._stylizers[mode] = Stylizer(self.models[mode], self.settings.device, dtype,
                                                 self.settings.style_cache_size)
            return self._stylizers[mode]


def _result(item: Item, status: str, error: dict[str, str] | None, attempts: int,
            seconds: float, worker: str, model: str | None) -> dict[str, Any]:
    return {"line": item.line, "id": item.id, "content": item.content,
            "style": item.style_field, "output": item.output, "status": status,
            "error": error, "attempts": attempts, "seconds": round(seconds, 4),
            "worker": worker, "model": model}


def _stylize_once(state: WorkerState, item: Item, etags: dict[str, str | None]) -> str:
    """One attempt: returns ``succeeded`` or ``skipped``; raises capvst errors."""
    st, s = state.storage, state.settings
    if st.exists(item.output):
        return "skipped"
    stylizer = state.stylizer(item.mode)

    def read(uri: str) -> bytes:
        return st.read(uri, s.max_input_bytes)

    content = images.decode_image(read(item.content), s.max_pixels)
    keys: list[str | None] = []
    loaders = []
    for uri in item.styles:
        if uri not in etags:
            etags[uri] = st.etag(uri)
        keys.append(f"{uri}#{etags[uri]}" if etags[uri] else None)
        loaders.append(lambda u=uri: images.decode_image(read(u), s.max_pixels))
    masks = (read(item.content_mask), read(item.style_mask)) \
        if item.content_mask and item.style_mask else (None, None)
    pixels = stylizer.stylize(content, loaders, weights=item.style_weights,
                              alpha_c=item.alpha_c, max_size=item.max_size,
                              content_mask=masks[0], style_mask=masks[1], style_keys=keys)
    data = images.encode(pixels, item.format)
    written = st.write(item.output, data, create_only=True,
                       content_type="image/jpeg" if item.format == "jpg"
                       else f"image/{item.format}")
    return "succeeded" if written else "skipped"


def process_item(state: WorkerState, job: str, item: Item, etags: dict[str, str | None],
                 on_finalize: Callable[[], None], current: Callable[[int], None] | None = None,
                 passthrough: tuple[type[BaseException], ...] = ()) -> dict[str, Any] | None:
    """Run one item to a recorded result; None when it already had one.

    Exceptions in ``passthrough`` (the caller's time limit) propagate unrecorded.
    """
    jobs, s = state.jobs, state.settings
    if jobs.result(job, item.line) is not None:
        return None
    model = state.models[item.mode].model_id if item.mode in state.models else None
    if current is not None:
        current(item.line)
    if jobs.cancelled(job):
        return _record(state, job, _result(item, "failed", {
            "code": "cancelled", "message": "the job was cancelled"},
            jobs.tries(job, item.line), 0.0, state.name, model), on_finalize)
    starts = jobs.start_item(job, item.line)
    if starts > s.max_deliveries:
        return _record(state, job, _result(item, "failed", {
            "code": "model_error",
            "message": f"the item was started {starts - 1} times and its worker died each time;"
                       " not retried again"}, jobs.tries(job, item.line), 0.0, state.name, model),
            on_finalize)
    error: dict[str, str] | None = None
    status = "failed"
    t0 = time.perf_counter()
    for attempt in range(s.task_max_retries + 1):
        jobs.count_try(job, item.line)
        t0 = time.perf_counter()
        try:
            status, error = _stylize_once(state, item, etags), None
            break
        except passthrough:
            raise
        except TransientError as exc:
            error = exc.as_dict()
            if attempt < s.task_max_retries:
                delay = backoff_delay(attempt, s.retry_backoff, s.retry_backoff_max)
                log.warning("line %s: %s; retry %d in %.1fs", item.line, exc.message,
                            attempt + 1, delay)
                time.sleep(delay)
                continue
            error["message"] += f" (gave up after {attempt + 1} attempts)"
        except PermanentError as exc:
            error = exc.as_dict()
            break
        except CapvstError as exc:
            error = exc.as_dict()
            break
        except (MemoryError, torch.cuda.OutOfMemoryError):
            error = {"code": "model_error", "message": "out of memory; use a smaller max_size"}
            break
        except Exception as exc:  # an unexpected bug must fail one item, not the worker loop
            if isinstance(exc, passthrough):
                raise
            log.exception("line %s: unexpected error", item.line)
            error = {"code": "model_error", "message": f"unexpected {type(exc).__name__}: {exc}"}
            break
    return _record(state, job, _result(item, status, error, jobs.tries(job, item.line),
                                       time.perf_counter() - t0, state.name, model), on_finalize)


def _record(state: WorkerState, job: str, result: dict[str, Any],
            on_finalize: Callable[[], None]) -> dict[str, Any]:
    _changed, due = state.jobs.record(job, result)
    if due:
        on_finalize()
    return result


def write_chunk_results(state: WorkerState, job: str, output_prefix: str, task_id: str,
                        items: Sequence[Item]) -> None:
    """Persist the chunk's final results next to the report (what resume rebuilds from)."""
    lines = [state.jobs.result(job, i.line) for i in items]
    body = "".join(json.dumps(r) + "\n" for r in lines if r is not None)
    if not body:
        return
    uri = join(output_prefix, "_capvst", job, "results", f"{task_id}.jsonl")
    try:
        state.storage.write(uri, body.encode(), create_only=True,
                            content_type="application/x-ndjson")
    except CapvstError as exc:  # Redis holds the results; this copy is for disaster recovery
        log.warning("could not write %s: %s", uri, exc.message)
