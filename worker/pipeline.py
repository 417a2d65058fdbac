"""What a stylize worker does with a chunk of items: a pipeline, no Celery.

Three stages per worker process, connected by bounded windows so memory stays flat:

1. fetch/decode (a thread pool): skip the item if its output exists, read and decode the
   content, resize it by the original's rule, read the styles whose statistics are not
   cached, read the masks;
2. the model (the task's own thread, which owns the device): consecutive items with the same
   styles, options and resized size go through the network together, up to
   ``CAPVST_BATCH_SIZE``; when a batch fails, its items run again one by one, so each gets
   its own result;
3. encode/upload (a thread pool): encode the image and write it create-only, tagged with
   the job and line that wrote it.

The next items are fetched while the current one is on the device, and finished images are
written while the next ones run. Results are recorded in Redis in batches. Every promise of
docs/RELIABILITY.md holds per item: one result per line (the job store keeps the best),
create-only outputs, cancellation, time limits, duplicate deliveries (final lines are
skipped), items that kill their worker (counted by the next run of the task; run one at a
time once suspected; failed after ``CAPVST_MAX_DELIVERIES`` deaths).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

from capvst import images
from capvst.errors import CapvstError, TransientError
from capvst.heartbeat import Heartbeat
from capvst.manifest import Item, check_output
from capvst.memory import default_batch_size
from capvst.results import ItemResult
from capvst.retry import RetryPolicy, wait_out
from capvst.storage import META_JOB, META_LINE

from .context import WorkerContext

log = logging.getLogger(__name__)


class HandBack(Exception):
    """The chunk's bookkeeping cannot proceed (Redis or the broker refuse): hand the
    unfinished items back to the queue."""


@dataclass
class Prepared:
    """An item after the fetch stage: its inputs, or its result when it ended early."""

    item: Item
    started: float
    attempts: int = 1
    content: Any = None
    styles: list[Any] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    masks: tuple[bytes | None, bytes | None] = (None, None)
    mask_key: str | None = None
    result: ItemResult | None = None
    #: Seconds per stage (capvst.metrics.STAGES), summed over retries.
    stages: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, fn: Any) -> Any:
        """Run ``fn``, adding its time to ``stage``."""
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.monotonic() - t0


@dataclass
class ChunkOutcome:
    """What happened to a chunk (the task's return value, shown in Flower)."""

    items: int
    processed: int = 0
    succeeded: int = 0
    skipped: int = 0
    failed: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    resent: int = 0
    #: items that went through the network in batches of more than one
    batched: int = 0
    note: str = ""

    @property
    def label(self) -> str:
        """``ITEM_FAILURES`` when an item of the chunk failed, else ``OK``: the first thing
        Flower shows of a chunk's result (the task itself succeeds either way; its items
        carry the outcome)."""
        return "ITEM_FAILURES" if self.failed else "OK"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the task's return value; ``outcome`` first so that Flower's
        result column starts with it)."""
        return {"outcome": self.label, "items": self.items, "processed": self.processed,
                "succeeded": self.succeeded, "skipped": self.skipped, "failed": self.failed,
                "codes": dict(sorted(self.codes.items())), "resent": self.resent,
                "batched": self.batched,
                "note": self.note}


class ChunkRunner:
    """Runs one chunk of one job's items to recorded results."""

    #: Exceptions that must reach the caller unrecorded (the task's time limit).
    passthrough: tuple[type[BaseException], ...] = ()

    def __init__(self, ctx: WorkerContext, job: str, items: Sequence[Item], task_id: str,
                 worker: str, hb: Heartbeat, soft_deadline: float | None = None) -> None:
        self.ctx = ctx
        self.s = ctx.settings
        self.jobs = ctx.jobs
        self.job = job
        self.items = list(items)
        self.task_id = task_id
        self.worker = worker
        self.hb = hb
        # monotonic time by which bookkeeping must give up (a little before the soft limit)
        self.deadline = soft_deadline if soft_deadline is not None else \
            time.monotonic() + self.s.soft_time_limit
        self.outcome = ChunkOutcome(items=len(self.items))
        self.cancel_token: str | None = None
        self.deaths: dict[int, int] = {}
        self.pending: list[ItemResult] = []
        self.done_lines: set[int] = set()
        #: the items on the device (one, or a batch), for the soft time limit
        self.current: list[Prepared] = []
        self.current_since = 0.0
        self._lock = threading.Lock()
        self._etags: dict[str, str | None] = {}
        self._last_flush = time.monotonic()
        self._policy = RetryPolicy(self.s.task_max_retries + 1, self.s.retry_backoff,
                                   self.s.retry_backoff_max)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _book(self, fn: Any) -> Any:
        """Run a Redis operation, waiting out transient faults until the deadline."""
        try:
            return wait_out(fn, self.deadline, self._policy)
        except Exception as exc:
            raise HandBack(f"{type(exc).__name__}: {exc}") from exc

    def add(self, result: ItemResult) -> None:
        """Queue a result for the next flush."""
        with self._lock:
            if result.line in self.done_lines:
                return
            self.done_lines.add(result.line)
            self.pending.append(result)
            o = self.outcome
            o.processed += 1
            setattr(o, result.status, getattr(o, result.status) + 1)
            if result.code:
                o.codes[result.code] = o.codes.get(result.code, 0) + 1

    def flush(self, force: bool = False) -> None:
        """Record queued results (one round trip per batch) and learn of a cancellation."""
        with self._lock:
            due_now = force or len(self.pending) >= self.s.inflight_items or \
                time.monotonic() - self._last_flush >= self.s.flush_seconds
            if not due_now:
                return
            batch, self.pending = self.pending, []
        self._last_flush = time.monotonic()
        try:
            if batch:
                _changed, due = self._book(lambda: self.jobs.record(
                    self.job, batch, cancel_token=self.cancel_token))
                for r in batch:  # counted once recorded: a handed-back chunk runs again
                    self.ctx.metrics.item(r.mode, r.status, r.code)
                if due:
                    self._book(lambda: self.ctx.send(
                        "capvst.finalize", {"job": self.job}, f"job={self.job}"))
            if self.cancel_token is None:
                self.cancel_token = self._book(lambda: self.jobs.cancel_token(self.job))
        except HandBack:
            with self._lock:
                self.pending = batch + self.pending
            raise

    # -- the chunk ------------------------------------------------------------------------------
    def run(self) -> ChunkOutcome:
        """Process the chunk; raises :class:`HandBack` when bookkeeping is impossible."""
        rec = self._book(lambda: self.jobs.record_of(self.job))
        if rec is None:
            # an unknown or expired job: nothing may be written for it, no key created
            log.warning("task %s: job %s is unknown; its %d items are dropped", self.task_id,
                        self.job, len(self.items))
            self.outcome.note = "unknown job"
            return self.outcome
        fields = self._book(lambda: self.jobs.fields(self.job))
        if fields.get("state") in ("done", "cancelled"):
            self.outcome.note = "job already finished"
            return self.outcome
        todo: list[Item] = []
        for item in self.items:
            try:
                check_output(item.output, rec.output)
                todo.append(item)
            except CapvstError as exc:
                self.add(self._failed(item, exc.code, exc.message))
        ranks = self._book(lambda: self.jobs.ranks(self.job, [i.line for i in todo]))
        todo = [i for i, r in zip(todo, ranks) if r == 0]
        self.cancel_token = fields.get("cancelled")
        if self.cancel_token is not None:
            for item in todo:
                self.add(self._failed(item, "cancelled", "the job was cancelled"))
            self.flush(force=True)
            return self.outcome
        self._account_previous_run(todo)
        self.deaths = dict(zip([i.line for i in todo], self._book(
            lambda: self.jobs.deaths(self.job, [i.line for i in todo]))))
        alive = []
        for item in todo:
            n = self.deaths.get(item.line, 0)
            if n >= self.s.max_deliveries:
                self.add(self._failed(item, "model_error",
                                      f"the worker died {n} times while this item was in "
                                      "flight; not retried again", attempts=0))
            else:
                alive.append(item)
        isolated = any(self.deaths.get(i.line, 0) for i in alive)
        self.hb.in_flight([i.line for i in alive])
        try:
            self._pipeline(alive, isolated)
        finally:
            self.flush(force=True)
        return self.outcome

    def _account_previous_run(self, todo: list[Item]) -> None:
        """If an earlier run of this task died, charge its in-flight lines (a death, or a
        timeout when it ran past the hard limit)."""
        prev = self.hb.previous
        if prev is None or prev.token == self.hb.token:
            return
        prev_alive = not prev.dead and bool(self._book(
            lambda: self.jobs.r.exists(f"capvst:alive:{self.task_id}:{prev.token}")))
        if prev_alive:
            return  # a concurrent copy of the same message: both run, results count once
        lines = [ln for ln in prev.lines if ln in {i.line for i in todo}]
        if not lines:
            return
        if prev.deadline is not None and time.time() >= prev.deadline:
            limit = self.s.task_time_limit
            for item in todo:
                if item.line in lines:
                    self.add(self._failed(item, "timeout", f"killed after the hard time limit "
                                                           f"of {limit} s"))
            todo[:] = [i for i in todo if i.line not in lines]
        else:
            log.warning("task %s: an earlier run died with lines %s in flight", self.task_id,
                        lines)
            self._book(lambda: self.jobs.add_deaths(self.job, lines))

    # -- stages -------------------------------------------------------------------------------
    def _failed(self, item: Item, code: str, message: str, attempts: int = 0,
                seconds: float = 0.0) -> ItemResult:
        return ItemResult.of_item(item, "failed", code=code, message=message,
                                  attempts=attempts + self.deaths.get(item.line, 0),
                                  seconds=seconds, worker=self.worker,
                                  model=self.ctx.model_id(item.mode))

    def _done(self, p: Prepared, status: str) -> ItemResult:
        return ItemResult.of_item(p.item, status,  # type: ignore[arg-type]
                                  attempts=p.attempts + self.deaths.get(p.item.line, 0),
                                  seconds=time.monotonic() - p.started, worker=self.worker,
                                  model=self.ctx.model_id(p.item.mode))

    def _retrying(self, p: Prepared, stage: str, fn: Any) -> Any:
        """Run a stage with retries of transient faults; a failure becomes p.result."""
        for attempt in range(self.s.task_max_retries + 1):
            p.attempts += attempt > 0
            try:
                return fn()
            except TransientError as exc:
                if attempt < self.s.task_max_retries:
                    delay = self._policy.delay(attempt)
                    log.warning("line %s: %s; retry %d in %.1fs", p.item.line, exc.message,
                                attempt + 1, delay)
                    time.sleep(delay)
                    continue
                p.result = self._failed(p.item, exc.code, f"{exc.message} (gave up after "
                                        f"{attempt + 1} attempts)", p.attempts,
                                        time.monotonic() - p.started)
            except CapvstError as exc:
                p.result = self._failed(p.item, exc.code, exc.message, p.attempts,
                                        time.monotonic() - p.started)
            except MemoryError:
                p.result = self._failed(p.item, "model_error",
                                        f"out of memory while {stage}", p.attempts)
            except self.passthrough:
                raise
            except Exception as exc:  # a bug fails one item, never the worker
                log.exception("line %s: unexpected error while %s", p.item.line, stage)
                p.result = self._failed(p.item, "model_error",
                                        f"unexpected {type(exc).__name__} while {stage}: "
                                        f"{exc}", p.attempts)
            return None
        return None

    def _fetch(self, item: Item) -> Prepared:
        p = Prepared(item, time.monotonic())
        self._retrying(p, "reading the inputs", lambda: self._fetch_once(p))
        return p

    def _fetch_once(self, p: Prepared) -> None:
        st, s, item = self.ctx.storage, self.s, p.item
        meta = p.timed("fetch", lambda: st.metadata(item.output))
        if meta is not None:
            mine = meta.get(META_JOB) == self.job and meta.get(META_LINE) == str(item.line)
            # written by an earlier delivery of this very item: it succeeded; otherwise the
            # output belongs to someone else and is never recomputed
            p.result = self._done(p, "succeeded" if mine else "skipped")
            return
        standin = s.standin_model_seconds is not None
        stylizer = None if standin else self.ctx.stylizer(item.mode)

        def read(uri: str) -> bytes:
            return p.timed("fetch", lambda: st.read(uri, s.max_input_bytes))

        def decode(data: bytes, max_size: int | None = None) -> Any:
            def run() -> Any:
                img = images.decode_image(data, s.max_pixels)
                return img if max_size is None else images.resize(img, max_size)
            return p.timed("decode", run)

        p.content = decode(read(item.content), item.max_size)
        masked = item.content_mask is not None and item.style_mask is not None
        p.mask_key = self._version(item.style_mask) if item.style_mask is not None else None
        p.styles, p.keys = [], []
        for uri in item.styles:
            key = self._version(uri)
            if key is not None and stylizer is not None and (not masked or p.mask_key) \
                    and stylizer.has_style(key, item.max_size, p.mask_key):
                # cached: read only if the statistics were evicted meanwhile
                p.styles.append(lambda u=uri: images.decode_image(read(u), s.max_pixels))
            else:
                p.styles.append(decode(read(uri)))
            p.keys.append(key)
        if masked:
            assert item.content_mask is not None and item.style_mask is not None
            p.masks = (read(item.content_mask), read(item.style_mask))

    def _version(self, uri: str) -> str | None:
        """``uri#etag``: names one version of an object for the style cache (None: no ETag,
        not cached). Asked once per chunk and object."""
        with self._lock:
            known = uri in self._etags
        etag = self._etags[uri] if known else self.ctx.storage.etag(uri)
        with self._lock:
            self._etags[uri] = etag
        return f"{uri}#{etag}" if etag else None

    def _batch_key(self, p: Prepared) -> tuple[Any, ...] | None:
        """Items with equal keys may share a batch on the device; None: always alone."""
        item = p.item
        if self.s.standin_model_seconds is not None or item.content_mask is not None \
                or item.style_mask is not None or p.content is None:
            return None
        try:  # an image that needs tiles runs alone
            width, height = p.content.size
            if self.ctx.stylizer(item.mode).tile_side(height, width, item.tile) is not None:
                return None
        except CapvstError:
            return None
        return (item.mode, tuple(item.styles), tuple(p.keys),
                None if item.style_weights is None else tuple(item.style_weights),
                item.alpha_c, item.max_size, tuple(p.content.size))

    def _model_batch(self, group: list[Prepared]) -> list[Any]:
        """Outputs of a batch; after any failure its items run one by one instead."""
        if len(group) == 1:
            return [self._model(group[0])]
        first = group[0]
        t0 = time.monotonic()
        self.current, self.current_since = group, t0
        try:
            stylizer = self.ctx.stylizer(first.item.mode)
            outs = stylizer.stylize_batch(
                [p.content for p in group], first.styles, weights=first.item.style_weights,
                alpha_c=first.item.alpha_c, max_size=first.item.max_size,
                style_keys=first.keys, tile=first.item.tile)
        except self.passthrough:
            raise
        except Exception as exc:  # per-item results (and retries) from the single path
            log.warning("a batch of %d items failed (%s: %s); running them one by one",
                        len(group), type(exc).__name__, exc)
            self.current = []
            return [self._model(p) for p in group]
        self.outcome.batched += len(group)
        share = (time.monotonic() - t0) / len(group)
        for p in group:
            p.stages["model"] = share
        self.current = []
        self.ctx.after_model(first.item.mode)
        return outs

    def _model(self, p: Prepared) -> Any:
        item = p.item
        t0 = time.monotonic()
        self.current, self.current_since = [p], t0
        if self.s.standin_model_seconds is not None:
            time.sleep(self.s.standin_model_seconds)
            import numpy as np

            out: Any = np.asarray(p.content.convert("RGB"))
        else:
            stylizer = self.ctx.stylizer(item.mode)
            out = self._retrying(p, "stylizing", lambda: stylizer.stylize(
                p.content, p.styles, weights=item.style_weights, alpha_c=item.alpha_c,
                max_size=item.max_size, content_mask=p.masks[0], style_mask=p.masks[1],
                style_keys=p.keys, mask_key=p.mask_key, tile=item.tile))
            self.ctx.after_model(item.mode)
        p.stages["model"] = time.monotonic() - t0
        self.current = []  # left set when the time limit interrupts the model
        return out

    def _write(self, p: Prepared, pixels: Any) -> ItemResult:
        item = p.item

        def once() -> bool:
            data = p.timed("encode", lambda: images.encode(
                pixels, item.format,  # type: ignore[arg-type]  # never a video here
                png_level=item.png_level, jpeg_quality=item.jpeg_quality,
                webp_quality=item.webp_quality))
            return p.timed("upload", lambda: self.ctx.storage.write(
                item.output, data, create_only=True,
                content_type="image/jpeg" if item.format == "jpg" else f"image/{item.format}",
                metadata={META_JOB: self.job, META_LINE: str(item.line)}))

        written = self._retrying(p, "writing the output", once)
        self.ctx.metrics.stages(p.stages)
        if p.result is not None:
            return p.result
        return self._done(p, "succeeded" if written else "skipped")

    def _next_batch(self, p: Prepared, fetches: deque[tuple[Item, Future[Prepared]]]
                    ) -> list[Prepared]:
        """``p`` and the items right after it that may share its batch (their fetches are
        already in flight: waiting for them keeps the batch whole)."""
        group = [p]
        key = self._batch_key(p)
        if key is None:
            return group
        limit = self.s.batch_size or default_batch_size(self.ctx.stylizer(p.item.mode).device)
        while fetches and len(group) < limit:
            q = fetches[0][1].result()
            if q.result is not None:  # ended early (output exists, bad input): record it
                fetches.popleft()
                self.ctx.metrics.stages(q.stages)
                self.add(q.result)
                continue
            if self._batch_key(q) != key:
                break
            fetches.popleft()
            group.append(q)
        return group

    def _pipeline(self, items: list[Item], isolated: bool) -> None:
        window = 1 if isolated else self.s.inflight_items
        fetches: deque[tuple[Item, Future[Prepared]]] = deque()
        writes: list[Future[ItemResult]] = []
        queue = deque(items)
        fetch_pool, encode_pool = self.ctx.fetch_pool, self.ctx.encode_pool
        assert fetch_pool is not None and encode_pool is not None

        def reap(block: bool = False) -> None:
            nonlocal writes
            if not writes:
                return
            if block:
                wait(writes)
            still = []
            for f in writes:
                if f.done():
                    self.add(f.result())
                else:
                    still.append(f)
            writes = still

        try:
            while queue or fetches:
                while queue and len(fetches) + len(writes) < window:
                    item = queue.popleft()
                    if isolated:
                        self.hb.in_flight([item.line])
                    fetches.append((item, fetch_pool.submit(self._fetch, item)))
                item, fut = fetches.popleft()
                p = fut.result()
                if p.result is None:
                    group = [p] if isolated else self._next_batch(p, fetches)
                    for q, pixels in zip(group, self._model_batch(group)):
                        if q.result is None:
                            writes.append(encode_pool.submit(self._write, q, pixels))
                        else:
                            self.ctx.metrics.stages(q.stages)  # ended before the writer
                            self.add(q.result)
                else:
                    self.ctx.metrics.stages(p.stages)  # ended before the writer
                    self.add(p.result)
                if isolated:
                    reap(block=True)
                reap()
                while len(writes) >= window:  # bounded: wait for the writer to catch up
                    wait(writes, return_when="FIRST_COMPLETED")
                    reap()
                self.flush()
                if self.cancel_token is not None:
                    for it in [i for i, _f in fetches] + list(queue):
                        self.add(self._failed(it, "cancelled", "the job was cancelled"))
                    for _i, f in fetches:
                        f.cancel()
                    fetches.clear()
                    queue.clear()
            reap(block=True)
        except BaseException:
            for _i, f in fetches:
                f.cancel()
            raise
        finally:
            self._unfinished = [i for i in items if i.line not in self.done_lines]
            self._writes = writes

    # -- the soft time limit -------------------------------------------------------------------
    def on_soft_timeout(self) -> list[list[Item]]:
        """The soft limit hit: finish what is being written, fail the item on the device if
        it used most of the budget, and return the unfinished items to send again, in
        chunks: a batch that used most of the budget goes back one item per chunk, so the
        slow item is found and failed alone."""
        limit = self.s.soft_time_limit
        writes = getattr(self, "_writes", [])
        if writes:
            wait(writes, timeout=min(10.0, max(1.0, limit / 10)))
            for f in writes:
                if f.done() and not f.cancelled() and f.exception() is None:
                    self.add(f.result())
        current, since = list(self.current), self.current_since
        rest = [i for i in getattr(self, "_unfinished", self.items)
                if i.line not in self.done_lines]
        chunks: list[list[Item]] = []
        if current and time.monotonic() - since >= limit / 2:
            if len(current) == 1:
                self.add(self._failed(current[0].item, "timeout",
                                      f"ran past the time limit of {limit} s",
                                      seconds=time.monotonic() - since))
            else:
                chunks = [[p.item] for p in current if p.item.line not in self.done_lines]
            on_device = {p.item.line for p in current}
            rest = [i for i in rest if i.line not in on_device]
        if rest:
            chunks.insert(0, rest)
        self.outcome.resent = sum(len(c) for c in chunks)
        return chunks
