"""Video items on the queue: ``capvst.video.plan``, ``capvst.video.segment`` and
``capvst.video.join`` (queue ``capvst.stylize``).

The flow of one video item (docs/ARCHITECTURE.md, "Video items")::

    expansion ──► plan: probe, cut at keyframes, write plan.json, send one task per segment
                   │
                   ├─► segment 0 ─┐   any worker, in any order; each writes seg-NNNN.mp4 (or
                   ├─► segment 1 ─┤   its PNG frames) and seg-NNNN.mp4.json create-only, then
                   └─► segment 2 ─┘   adds its index to the item's done set in Redis
                                  │
                     the segment that completes the set sends join ──► join: concatenate in
                     order, copy the audio, write the output create-only, record the item

Everything a segment needs is in ``plan.json`` under
``{output prefix}/_capvst/{job}/video/{line}/``; Redis holds only the done set and a tries
counter per segment. Each step is idempotent (create-only objects, a set, results that count
once), so a redelivered or duplicated message does no harm. Every task holds a lease
(:class:`~capvst.heartbeat.Heartbeat`) like a stylize chunk: when its process dies, Celery
requeues the message (a pool process lost) or the reconciler restores it (a node lost), and
the next run counts the death against that segment; after ``CAPVST_MAX_DELIVERIES`` deaths,
or ``CAPVST_TASK_MAX_RETRIES`` failures of one segment, the item fails.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task
from celery.exceptions import Reject

from capvst import images
from capvst.broker import (
    TaskNames,
    VideoJoinPayload,
    VideoPlanPayload,
    VideoSegmentPayload,
)
from capvst.errors import CapvstError, ModelError, PermanentError, TooSmall, TransientError
from capvst.heartbeat import Heartbeat
from capvst.manifest import Item, check_output
from capvst.results import ItemResult
from capvst.retry import backoff_delay, is_transient_infrastructure, with_retries
from capvst.storage import META_JOB, META_LINE, join

from . import app
from .context import WorkerContext
from .tasks import Process, StylizeTask

log = logging.getLogger(__name__)

#: How many plans a worker process keeps parsed (plans of long videos hold every pts).
PLAN_CACHE = 4


# --- where things are ------------------------------------------------------------------------

def video_folder(output_prefix: str, job: str, line: int) -> str:
    """``{output prefix}/_capvst/{job}/video/{line}``: the item's plan, segments, result."""
    return join(output_prefix, "_capvst", job, "video", str(line))


def segment_uri(folder: str, index: int) -> str:
    """The media of segment ``index`` (its JSON result is next to it, ``.json`` added)."""
    return join(folder, f"seg-{index:04d}.mp4")


def done_key(job: str, line: int) -> str:
    """Redis set of the item's finished segment indexes."""
    from capvst.jobs import JobStore

    return JobStore.key(job, f"video:{line}:done")


def tries_key(job: str, line: int) -> str:
    """Redis hash: segment index -> failed or lost runs of that segment."""
    from capvst.jobs import JobStore

    return JobStore.key(job, f"video:{line}:tries")


@dataclass
class Plan:
    """A planned video item: the item, the video's facts and its segments."""

    item: Item
    info: Any  # capvst.video.VideoInfo
    segments: list[Any]  # capvst.video.Segment
    created: float

    def to_json(self) -> bytes:
        """The stored form (``plan.json``)."""
        return json.dumps({"item": self.item.model_dump(), "created": self.created,
                           "info": self.info.as_dict(with_pts=True),
                           "segments": [s.as_dict() for s in self.segments]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        """Inverse of :meth:`to_json`."""
        from capvst.video import Segment, VideoInfo

        d = json.loads(data)
        return cls(Item.model_validate(d["item"]), VideoInfo.from_dict(d["info"]),
                   [Segment.from_dict(s) for s in d["segments"]], float(d["created"]))


_PLANS: dict[str, Plan] = {}


class Done(Exception):
    """The step has nothing (more) to do; the message is acknowledged."""


class VideoStep:
    """One run of a video task for one item: bookkeeping shared by the three steps."""

    def __init__(self, ctx: WorkerContext, job: str, line: int, task_id: str, worker: str
                 ) -> None:
        self.ctx = ctx
        self.s = ctx.settings
        self.jobs = ctx.jobs
        self.store = ctx.storage
        self.job = job
        self.line = line
        self.task_id = task_id
        self.worker = worker
        self.started = time.monotonic()
        self.deadline = time.monotonic() + self.s.soft_time_limit
        rec = self.jobs.record_of(job)
        fields = self.jobs.fields(job)
        if rec is None or not fields:
            log.warning("task %s: job %s is unknown; video line %s dropped", task_id, job, line)
            raise Done("unknown job")
        if fields.get("state") in ("done", "cancelled"):
            raise Done("job already finished")
        self.rec = rec
        self.cancel_token = fields.get("cancelled")
        self.folder = video_folder(rec.output, job, line)

    # -- the item's result ----------------------------------------------------------------
    def final(self) -> bool:
        """Whether the item already has a result."""
        return self.jobs.ranks(self.job, [self.line])[0] > 0

    def record(self, result: ItemResult) -> None:
        """Record the item's result (once; the job store keeps the best) and send finalize
        when it was the job's last."""
        _changed, due = self.jobs.record(self.job, [result], cancel_token=self.cancel_token)
        if due:
            self.ctx.send(TaskNames.FINALIZE.value, {"job": self.job}, f"job={self.job}")

    def fail(self, item: Item, code: str, message: str) -> None:
        """Fail the item with ``code`` and forget its segment bookkeeping."""
        log.warning("job %s line %s: video failed %s: %s", self.job, self.line, code, message)
        self.record(ItemResult.of_item(item, "failed", code=code, message=message,
                                       attempts=self.attempts(),
                                       seconds=self.elapsed(), worker=self.worker,
                                       model=self.ctx.model_id(item.mode)))
        self.forget()

    def cancelled(self, item: Item) -> bool:
        """Fail the item ``cancelled`` when its job was cancelled; True if so."""
        if self.cancel_token is None:
            return False
        self.record(ItemResult.of_item(item, "failed", code="cancelled",
                                       message="the job was cancelled", worker=self.worker))
        return True

    def attempts(self) -> int:
        """Runs of the item's segments (1 each, plus retries and deaths)."""
        extra = sum(int(v) for v in self.jobs.r.hvals(tries_key(self.job, self.line)))  # type: ignore[union-attr]
        return 1 + extra

    def elapsed(self, plan: Plan | None = None) -> float:
        """Seconds since the item was planned (this run's, without a plan)."""
        if plan is not None:
            return max(0.0, time.time() - plan.created)
        return time.monotonic() - self.started

    def forget(self) -> None:
        """Drop the item's Redis keys (the job's own state keeps its result)."""
        self.jobs.r.delete(done_key(self.job, self.line), tries_key(self.job, self.line))

    # -- storage --------------------------------------------------------------------------
    def retrying(self, fn: Any) -> Any:
        """Run a storage step, retrying transient faults with backoff."""
        return with_retries(fn, self.s.task_max_retries + 1, self.s.retry_backoff,
                            self.s.retry_backoff_max)

    def plan_uri(self) -> str:
        """``plan.json`` of the item."""
        return join(self.folder, "plan.json")

    def result_uri(self) -> str:
        """``result.json``: the joined item's figures, written before it is recorded."""
        return join(self.folder, "result.json")

    def load_plan(self) -> Plan | None:
        """The item's plan from storage (cached per process), or None."""
        uri = self.plan_uri()
        plan = _PLANS.get(uri)
        if plan is not None:
            return plan
        if not self.retrying(lambda: self.store.exists(uri)):
            return None
        plan = Plan.from_json(self.retrying(lambda: self.store.read(uri)))
        while len(_PLANS) >= PLAN_CACHE:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[uri] = plan
        return plan

    def done_segments(self) -> set[int]:
        """Indexes of the segments recorded as finished."""
        return {int(x) for x in self.jobs.r.smembers(done_key(self.job, self.line))}  # type: ignore[union-attr]

    def mark_done(self, plan: Plan, index: int) -> None:
        """Add a finished segment; the run that completes the set sends join (a duplicate
        join is harmless: the output is create-only and the result counts once)."""
        key = done_key(self.job, self.line)
        pipe = self.jobs.r.pipeline()
        pipe.sadd(key, index)
        pipe.expire(key, self.jobs.ttl)
        pipe.scard(key)
        n = int(pipe.execute()[2])
        if n >= len(plan.segments):
            send_join(self.ctx, self.job, self.line)

    def add_try(self, index: int) -> int:
        """Count a failed or lost run of segment ``index``; returns its count."""
        key = tries_key(self.job, self.line)
        pipe = self.jobs.r.pipeline()
        pipe.hincrby(key, str(index), 1)
        pipe.expire(key, self.jobs.ttl)
        return int(pipe.execute()[0])

    def output_owner(self, item: Item) -> str | None:
        """``mine`` when this job and line wrote the item's output, ``other`` when someone
        else did, None when it does not exist (frames outputs: never checked here)."""
        if item.format == "frames":
            return None
        meta = self.retrying(lambda: self.store.metadata(item.output))
        if meta is None:
            return None
        mine = meta.get(META_JOB) == self.job and meta.get(META_LINE) == str(item.line)
        return "mine" if mine else "other"


def send_segment(ctx: WorkerContext, job: str, line: int, index: int, why: str = "") -> None:
    """Queue one segment of a planned item."""
    ctx.send(TaskNames.VIDEO_SEGMENT.value, dict(job=job, line=line, index=index),
             f"job={job} line={line} segment={index}" + (f" ({why})" if why else ""))


def send_join(ctx: WorkerContext, job: str, line: int) -> None:
    """Queue the join of an item whose segments are all done."""
    ctx.send(TaskNames.VIDEO_JOIN.value, dict(job=job, line=line), f"job={job} line={line}")


def _limits(ctx: WorkerContext) -> Any:
    from capvst.video import VideoLimits

    return VideoLimits.from_settings(ctx.settings)


# --- plan --------------------------------------------------------------------------------------

def plan_item(step: VideoStep, item: Item) -> str:
    """Probe and plan a video item (once: ``plan.json`` is create-only) and send every
    segment not done yet; returns what happened."""
    if step.final():
        return "final"
    if step.cancelled(item):
        return "cancelled"
    try:
        check_output(item.output, step.rec.output)
        owner = step.output_owner(item)
        if owner == "other":
            step.record(ItemResult.of_item(item, "skipped", worker=step.worker,
                                           model=step.ctx.model_id(item.mode)))
            return "skipped"
        if owner == "mine" and _record_joined(step, item):
            return "succeeded"
        plan = step.load_plan() or step.retrying(lambda: _make_plan(step, item))
    except CapvstError as exc:
        step.fail(item, exc.code, exc.message)
        return exc.code
    done = step.done_segments()
    todo = [s.index for s in plan.segments if s.index not in done]
    for index in todo:
        send_segment(step.ctx, step.job, step.line, index)
    if not todo:
        send_join(step.ctx, step.job, step.line)
    log.info("job %s line %s: %d frames in %d segments (%d sent)", step.job, step.line,
             plan.info.frames, len(plan.segments), len(todo))
    return "planned"


def _make_plan(step: VideoStep, item: Item) -> Plan:
    from capvst.video import open_video, plan_segments

    s = step.s
    with open_video(step.store, item.content, _limits(step.ctx), fps=s.video_frames_fps,
                    max_frame_bytes=s.max_input_bytes) as src:
        info = src.info
    w, h = images.resized_size(info.width, info.height, item.max_size)
    if w < images.MIN_SIDE or h < images.MIN_SIDE:
        raise TooSmall(f"video is {info.width}x{info.height}, {w}x{h} after resizing; the "
                       f"network needs sides of at least {images.MIN_SIDE} pixels")
    plan = Plan(item, info, plan_segments(info, s.video_segment_seconds), time.time())
    uri = step.plan_uri()
    if not step.store.write(uri, plan.to_json(), create_only=True,
                            content_type="application/json"):
        plan = Plan.from_json(step.store.read(uri))  # another delivery planned first
    return plan


# --- segment -----------------------------------------------------------------------------------

def run_segment(step: VideoStep, index: int, hb: Heartbeat) -> str:
    """Stylize one segment (idempotent: a stored result is reused); returns what
    happened."""
    if step.final():
        return "final"
    plan = step.load_plan()
    if plan is None:
        raise ModelError(f"segment {index} of line {step.line} has no plan")
    item = plan.item
    if step.cancelled(item):
        return "cancelled"
    if index >= len(plan.segments):
        step.fail(item, "model_error", f"segment {index} is not in the plan")
        return "failed"
    seg_uri = segment_uri(step.folder, index)
    if index in step.done_segments() or _stored_result(step, seg_uri):
        step.mark_done(plan, index)  # a copy of a finished segment: make sure join is sent
        return "done already"
    if _previous_run_died(step, hb):
        n = step.add_try(index)
        log.warning("job %s line %s: an earlier run of segment %d died (%d so far)",
                    step.job, step.line, index, n)
        if n >= step.s.max_deliveries:
            step.fail(item, "model_error", f"the worker died {n} times while segment {index} "
                                           "was in flight; not retried again")
            return "failed"
    try:
        _stylize_segment(step, plan, index, seg_uri)
    except Exception as exc:
        if isinstance(exc, PermanentError) and not isinstance(exc, ModelError):
            # the input is at fault (bad_video, not_found, ...): running it again cannot help
            step.fail(item, exc.code, f"segment {index}: {exc.message}")
            return exc.code
        if is_transient_infrastructure(exc):
            raise  # Redis or the broker: the message goes back as it is
        if not isinstance(exc, (CapvstError, SoftTimeLimitExceeded)):
            log.exception("job %s line %s: segment %d failed", step.job, step.line, index)
        code = "timeout" if isinstance(exc, SoftTimeLimitExceeded) else (
            exc.code if isinstance(exc, CapvstError) else "model_error")
        message = (f"ran past the time limit of {step.s.soft_time_limit} s"
                   if isinstance(exc, SoftTimeLimitExceeded) else
                   exc.message if isinstance(exc, CapvstError) else
                   f"{type(exc).__name__}: {exc}")
        n = step.add_try(index)
        if n > step.s.task_max_retries:
            step.fail(item, code, f"segment {index} failed {n} times; last: {message}")
            return "failed"
        delay = backoff_delay(n - 1, step.s.retry_backoff, step.s.retry_backoff_max)
        log.warning("job %s line %s: segment %d failed (%s); retry %d in %.1fs", step.job,
                    step.line, index, message, n, delay)
        time.sleep(delay)
        send_segment(step.ctx, step.job, step.line, index, f"retry {n}")
        return "retried"
    step.mark_done(plan, index)
    return "done"


def _stored_result(step: VideoStep, seg_uri: str) -> bool:
    """Whether the segment's result is in storage (Redis may have lost the done set)."""
    from capvst.video.run import result_uri

    return bool(step.retrying(lambda: step.store.exists(result_uri(seg_uri))))


def _previous_run_died(step: VideoStep, hb: Heartbeat) -> bool:
    prev = hb.previous
    if prev is None or prev.token == hb.token:
        return False
    if not prev.dead and step.jobs.r.exists(f"capvst:alive:{step.task_id}:{prev.token}"):
        return False  # a concurrent copy of the same message, still running
    return True


def _stylize_segment(step: VideoStep, plan: Plan, index: int, seg_uri: str) -> Any:
    from capvst.video import (
        FrameStylizer,
        open_content_mask,
        open_video,
        output_spec,
        stylize_segment,
    )

    s, item, store = step.s, plan.item, step.store
    stylizer = step.ctx.stylizer(item.mode)

    def read(uri: str) -> bytes:
        return step.retrying(lambda: store.read(uri, s.max_input_bytes))

    styles, keys = [], []
    for uri in item.styles:
        etag = step.retrying(lambda u=uri: store.etag(u))
        keys.append(f"{uri}#{etag}" if etag else None)
        styles.append(images.decode_image(read(uri), s.max_pixels))
    style_mask = read(item.style_mask) if item.style_mask else None
    frames = FrameStylizer(stylizer, styles, weights=item.style_weights, alpha_c=item.alpha_c,
                           max_size=item.max_size, style_keys=keys, style_mask=style_mask)
    spec = output_spec(item.output, item.format)
    limits = _limits(step.ctx)
    with open_video(store, item.content, limits, info=plan.info, fps=s.video_frames_fps,
                    max_frame_bytes=s.max_input_bytes) as src, \
            open_content_mask(store, item.content_mask, limits, s.video_frames_fps,
                          s.max_input_bytes) as mask:
        return stylize_segment(src, plan.segments[index], frames, spec, store,
                               segment_uri=seg_uri, output_uri=item.output, content_mask=mask)


# --- join --------------------------------------------------------------------------------------

def join_item(step: VideoStep) -> str:
    """Join the item's segments into its output and record the item; returns what
    happened."""
    if step.final():
        return "final"
    plan = step.load_plan()
    if plan is None:
        raise ModelError(f"line {step.line} has no plan to join")
    item = plan.item
    if step.cancelled(item):
        return "cancelled"
    try:
        owner = step.output_owner(item)
        if owner == "mine" and _record_joined(step, item):
            return "succeeded"
        if owner == "other":
            step.record(ItemResult.of_item(item, "skipped", worker=step.worker,
                                           model=step.ctx.model_id(item.mode)))
            return "skipped"
        return _join(step, plan)
    except CapvstError as exc:  # permanent, or transient after its retries
        step.fail(item, exc.code, exc.message)
        return exc.code


def _join(step: VideoStep, plan: Plan) -> str:
    from capvst.video import join_video, open_video, output_spec, read_segment_result

    item, store, s = plan.item, step.store, step.s
    results = []
    missing = []
    for seg in plan.segments:
        r = step.retrying(lambda i=seg.index: read_segment_result(
            store, segment_uri(step.folder, i)))
        if r is None:
            missing.append(seg.index)
        else:
            results.append(r)
    if missing:  # the done set and storage disagree (storage wins): run those again
        step.jobs.r.srem(done_key(step.job, step.line), *missing)
        for i in missing:
            send_segment(step.ctx, step.job, step.line, i, "missing at the join")
        return "segments missing"
    spec = output_spec(item.output, item.format)
    meta = {META_JOB: step.job, META_LINE: str(item.line)}
    with open_video(store, item.content, _limits(step.ctx), info=plan.info,
                    fps=s.video_frames_fps, max_frame_bytes=s.max_input_bytes) as src:
        video = step.retrying(lambda: join_video(src, results, spec, store, item.output,
                                                 metadata=meta))
    status = "succeeded"
    if not video.written and step.output_owner(item) == "other":
        status = "skipped"
    result = ItemResult.of_item(item, status,  # type: ignore[arg-type]
                                attempts=step.attempts(), seconds=step.elapsed(plan),
                                worker=step.worker, model=step.ctx.model_id(item.mode))
    result = result.model_copy(update=_video_fields(video.report_fields()))
    store.write(step.result_uri(), result.to_json().encode(), content_type="application/json")
    step.record(result)
    step.forget()
    _drop_segments(step, plan)
    return status


def _video_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if out.get("warping_error") is not None:
        out["warping_error"] = round(float(out["warping_error"]), 6)
    return out


def _record_joined(step: VideoStep, item: Item) -> bool:
    """Record the item from the ``result.json`` an earlier join wrote; False if none."""
    uri = step.result_uri()
    if not step.retrying(lambda: step.store.exists(uri)):
        return False
    result = ItemResult.from_json(step.retrying(lambda: step.store.read(uri)))
    step.record(result.model_copy(update={"finished_at": time.time()}))
    return True


def _drop_segments(step: VideoStep, plan: Plan) -> None:
    """Delete the segment media once the output holds them (their JSON results stay, small,
    as the record of what each segment did)."""
    if plan.item.format == "frames":
        return
    for seg in plan.segments:
        try:
            step.store.delete(segment_uri(step.folder, seg.index))
        except Exception as exc:  # left behind: only space
            log.debug("could not delete segment %d: %s", seg.index, exc)


# --- the Celery tasks --------------------------------------------------------------------------

def _run(task: Task, job: str, line: int, body: Any, item: Item | None = None) -> str:
    """Common frame of the three tasks: context, lease, and the hand-back rules.

    The lease carries the item, as a stylize chunk's does: a run killed by the hard time
    limit (its message acknowledged, none left to run again) has the item failed
    ``timeout`` by the reconciler.
    """
    ctx = Process.context()
    s = ctx.settings
    task_id = task.request.id or "local"
    worker = task.request.hostname or ctx.name
    try:
        step = VideoStep(ctx, job, line, task_id, worker)
    except Done as exc:
        return str(exc)
    except Exception as exc:
        if is_transient_infrastructure(exc):
            _hand_back(task_id, f"{type(exc).__name__}: {exc}", s.retry_backoff_max)
        raise
    try:
        if item is None:
            plan = step.load_plan()
            item = plan.item if plan is not None else None
        with Heartbeat(ctx.jobs, task_id, job, [line],
                       items=[item.model_dump()] if item is not None else None,
                       deadline=time.time() + s.task_time_limit) as hb:
            return str(body(step, hb))
    except Done as exc:
        return str(exc)
    except Exception as exc:
        if is_transient_infrastructure(exc) or isinstance(exc, TransientError):
            _hand_back(task_id, f"{type(exc).__name__}: {exc}", s.retry_backoff_max)
        log.exception("task %s: internal error on video line %s", task_id, line)
        _fail_internal(ctx, job, line, task_id, worker, f"internal error: "
                                                        f"{type(exc).__name__}: {exc}")
        return "failed"


def _fail_internal(ctx: WorkerContext, job: str, line: int, task_id: str, worker: str,
                   message: str) -> None:
    try:
        step = VideoStep(ctx, job, line, task_id, worker)
        plan = step.load_plan()
        if plan is not None and not step.final():
            step.fail(plan.item, "model_error", message)
    except Exception:
        _hand_back(task_id, "could not record the internal error",
                   ctx.settings.retry_backoff_max)


def _hand_back(task_id: str, why: str, pause: float) -> None:
    log.warning("task %s: handing the video step back: %s", task_id, why)
    time.sleep(min(5.0, pause))
    raise Reject(why, requeue=True)


@app.task(name=TaskNames.VIDEO_PLAN.value, bind=True, base=StylizeTask, shared=False)
def plan(self: Task, job: str, item: dict[str, Any]) -> str:
    """Probe a video item, cut it into segments and send them."""
    p = VideoPlanPayload.model_validate({"job": job, "item": item})

    def body(step: VideoStep, _hb: Heartbeat) -> str:
        try:
            return plan_item(step, p.item)
        except TransientError as exc:  # storage kept failing: the item fails with it
            step.fail(p.item, exc.code, f"{exc.message} (gave up)")
            return exc.code

    return _run(self, p.job, p.item.line, body, p.item)


@app.task(name=TaskNames.VIDEO_SEGMENT.value, bind=True, base=StylizeTask, shared=False)
def segment(self: Task, job: str, line: int, index: int) -> str:
    """Stylize one segment of a planned video item."""
    p = VideoSegmentPayload.model_validate({"job": job, "line": line, "index": index})
    return _run(self, p.job, p.line, lambda step, hb: run_segment(step, p.index, hb))


@app.task(name=TaskNames.VIDEO_JOIN.value, bind=True, base=StylizeTask, shared=False)
def join_segments(self: Task, job: str, line: int) -> str:
    """Join a video item's segments and record the item."""
    p = VideoJoinPayload.model_validate({"job": job, "line": line})

    # no lock: two joins of one item write one output (create-only) and count once
    return _run(self, p.job, p.line, lambda step, _hb: join_item(step))


__all__ = ["Plan", "done_key", "join_item", "plan_item", "run_segment", "segment_uri",
           "tries_key", "video_folder"]
