"""Celery tasks: thin wrappers that validate a payload and call plain functions.

``capvst.stylize`` runs on stylize workers (queue ``capvst.stylize``); ``capvst.expand`` and
``capvst.finalize`` run on the scheduler (queue ``capvst.schedule``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task
from celery import signals as celery_signals
from celery.exceptions import Reject, TimeLimitExceeded
from pydantic import BaseModel, ConfigDict

from capvst.errors import CapvstError, TransientError
from capvst.jobs import JobStore, connect
from capvst.manifest import Item
from capvst.settings import Settings
from capvst.storage import Storage
from capvst.types import Mode

from . import app
from .config import Queues, TaskNames

if TYPE_CHECKING:
    from capvst.model.checkpoint import LoadedModel

log = logging.getLogger(__name__)

_ROLE: str | None = None            # "stylize" or "schedule", decided in the worker's parent
_MODELS: dict[Mode, LoadedModel] = {}
_STATE: Any = None                   # runner.WorkerState, built lazily per process
_SCHED: Any = None                   # scheduler.service.Context, built lazily per process
_JOBS: JobStore | None = None


def settings() -> Settings:
    """The settings the app was built with."""
    return app.conf.capvst_settings  # type: ignore[no-any-return]


def job_store() -> JobStore:
    """This process's job store (built after fork)."""
    global _JOBS
    if _JOBS is None:
        s = settings()
        _JOBS = JobStore(connect(s.broker_url, sentinel_master=s.sentinel_master,
                                 sentinel_password=s.sentinel_password),
                         int(s.job_ttl_days * 86400))
    return _JOBS


def send(name: str, kwargs: dict[str, Any], argsrepr: str, countdown: float | None = None
         ) -> None:
    """Publish a task by name with a readable argument summary for Flower."""
    app.send_task(name, kwargs=kwargs, argsrepr="()", kwargsrepr=argsrepr, countdown=countdown)


def load_models(s: Settings) -> dict[Mode, LoadedModel]:
    """Every configured mode's checkpoint, on the CPU (no CUDA before fork)."""
    from capvst import load_model

    out: dict[Mode, LoadedModel] = {}
    store = Storage(s, confine_local=False)  # checkpoints are the operator's, not the user's
    for mode in s.modes:
        uri, pinned = s.checkpoint_for(mode)
        out[mode] = load_model(mode, uri, expected_sha256=pinned, storage=store)
        log.info("loaded %s model %s", mode, out[mode].model_id)
    return out


@celery_signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    global _ROLE, _MODELS
    if sender is None or sender.app is not app:
        return  # another app's worker in this interpreter
    queues = sender.app.amqp.queues
    names = set((queues.consume_from or queues).keys())
    _ROLE = "stylize" if Queues.STYLIZE.value in names else "schedule"
    if _ROLE == "stylize":
        # a bad checkpoint stops the worker's start, loudly, rather than failing every item;
        # Celery only logs exceptions from signal handlers, so leave with SystemExit
        try:
            _MODELS = load_models(settings())
        except CapvstError as exc:
            log.critical("capvst worker cannot start: %s", exc.message)
            raise SystemExit(f"capvst worker cannot start: {exc.message}") from None


@celery_signals.worker_process_init.connect
def _process_init(**_: Any) -> None:
    if _ROLE != "stylize":
        return
    try:
        state = worker_state()
        for mode in state.models:  # move to the device now, in the child, never the parent
            st = state.stylizer(mode)
            log.info("%s model %s ready on %s", mode, st.model_id, st.device)
    except Exception as exc:
        # a process that cannot use its device must not drain the queue with failures:
        # stop the whole worker (warm shutdown hands back what it holds)
        log.critical("stylize process cannot start (%s); stopping the worker", exc)
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)


def worker_state() -> Any:
    """This process's runner.WorkerState."""
    global _STATE, _MODELS
    if _STATE is None:
        from .runner import WorkerState

        s = settings()
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        if not _MODELS:
            _MODELS = load_models(s)
        _STATE = WorkerState(s, Storage(s), job_store(), _MODELS, name=_hostname())
    return _STATE


def _hostname() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


class StylizePayload(BaseModel):
    """Arguments of ``capvst.stylize``."""

    model_config = ConfigDict(extra="forbid")
    job: str
    items: list[Item]


def _current_key(task_id: str) -> str:
    return f"capvst:task:{task_id}:current"


def _resend(job: str, items: list[Item], why: str) -> None:
    if items:
        send(TaskNames.STYLIZE.value, dict(job=job, items=[i.model_dump() for i in items]),
             f"job={job} lines={items[0].line}.. items={len(items)} ({why})")


def _finalize_due(job: str) -> None:
    send(TaskNames.FINALIZE.value, dict(job=job), f"job={job}")


class StylizeTask(Task):
    """Handles the hard time limit, which kills the child: the item that was running fails
    with ``timeout`` and the chunk's other unfinished items are queued again."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        if not isinstance(exc, TimeLimitExceeded):
            return
        try:
            payload = StylizePayload.model_validate(kwargs)
            jobs = job_store()
            current = jobs.r.get(_current_key(task_id))
            rest = []
            for item in payload.items:
                if jobs.result(payload.job, item.line) is not None:
                    continue
                if current is not None and str(item.line) == str(current):
                    from .runner import _result

                    res = _result(item, "failed", {
                        "code": "timeout",
                        "message": f"killed after the hard time limit of "
                                   f"{settings().task_time_limit} s"},
                        jobs.tries(payload.job, item.line), float(settings().task_time_limit),
                        "", None)
                    _changed, due = jobs.record(payload.job, res)
                    if due:
                        _finalize_due(payload.job)
                else:
                    rest.append(item)
            _resend(payload.job, rest, "after a hard timeout")
        except Exception:  # never let the parent's bookkeeping crash the worker
            log.exception("could not account for a hard timeout of task %s", task_id)


@app.task(name=TaskNames.STYLIZE.value, bind=True, base=StylizeTask, shared=False)
def stylize(self: Task, job: str, items: list[dict[str, Any]]) -> dict[str, int]:
    """Stylize a chunk of one job's items."""
    from .runner import process_item, write_chunk_results

    payload = StylizePayload.model_validate({"job": job, "items": items})
    task_id = self.request.id or "local"
    try:
        state = worker_state()
        if self.request.hostname:
            state.name = self.request.hostname  # the name Flower shows, e.g. stylize@node-3
        ttl = settings().task_time_limit + 600
        etags: dict[str, str | None] = {}
        done = 0
        for k, item in enumerate(payload.items):
            started = time.monotonic()
            try:
                res = process_item(
                    state, payload.job, item, etags, lambda: _finalize_due(payload.job),
                    current=lambda line: state.jobs.r.set(_current_key(task_id), line, ex=ttl),
                    passthrough=(SoftTimeLimitExceeded,))
                done += res is not None
            except SoftTimeLimitExceeded:
                _soft_timeout(state, payload, k, time.monotonic() - started)
                break
        rec = state.jobs.record_of(payload.job)
        if rec is not None:
            write_chunk_results(state, payload.job, rec.output, task_id, payload.items)
        state.jobs.r.delete(_current_key(task_id))
        return {"items": len(payload.items), "processed": done}
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # the job store is unreachable even after retries: hand the task back, lose nothing
        raise Reject(f"Redis unavailable: {exc}", requeue=True) from None
    except CapvstError as exc:
        # this process cannot stylize at all (e.g. its model failed to load): the chunk's
        # unfinished items fail with the reason rather than vanishing with an acked message
        log.error("task %s: %s", task_id, exc.message)
        _fail_unfinished(payload, exc.code, exc.message)
        return {"items": len(payload.items), "processed": 0}


def _fail_unfinished(payload: StylizePayload, code: str, message: str) -> None:
    from .runner import _result

    jobs = job_store()
    for item in payload.items:
        if jobs.result(payload.job, item.line) is None:
            _changed, due = jobs.record(payload.job, _result(
                item, "failed", {"code": code, "message": message},
                jobs.tries(payload.job, item.line), 0.0, "", None))
            if due:
                _finalize_due(payload.job)


def _soft_timeout(state: Any, payload: StylizePayload, k: int, elapsed: float) -> None:
    """The soft limit hit item ``k``: it fails with ``timeout`` if it used most of the time
    itself, otherwise it and the rest go back to the queue with a fresh budget."""
    from .runner import _record, _result

    limit = settings().soft_time_limit
    item = payload.items[k]
    rest = payload.items[k + 1:]
    if elapsed >= limit / 2:
        if state.jobs.result(payload.job, item.line) is None:
            model = state.models[item.mode].model_id if item.mode in state.models else None
            _record(state, payload.job, _result(
                item, "failed", {"code": "timeout",
                                 "message": f"ran past the time limit of {limit} s"},
                state.jobs.tries(payload.job, item.line), elapsed, state.name, model),
                lambda: _finalize_due(payload.job))
    else:
        rest = payload.items[k:]
    _resend(payload.job, rest, "after a soft timeout")


def _scheduler() -> Any:
    global _SCHED
    if _SCHED is None:
        from scheduler.service import Context

        s = settings()
        jobs = job_store()
        _SCHED = Context(s, Storage(s), jobs, send,
                         lambda: int(jobs.r.llen(Queues.STYLIZE.value)))
    return _SCHED


@app.task(name=TaskNames.EXPAND.value, bind=True, shared=False,
          autoretry_for=(TransientError, redis.ConnectionError, redis.TimeoutError),
          retry_backoff=2, retry_backoff_max=60, max_retries=30)
def expand(self: Task, job: str, epoch: int, offset: int, line: int) -> str:
    """Expand one slice of a job's manifest."""
    from scheduler.service import expand_slice

    return expand_slice(_scheduler(), job, int(epoch), int(offset), int(line))


@app.task(name=TaskNames.FINALIZE.value, bind=True, shared=False,
          autoretry_for=(TransientError, redis.ConnectionError, redis.TimeoutError),
          retry_backoff=2, retry_backoff_max=60, max_retries=30)
def finalize(self: Task, job: str) -> str:
    """Write the report of a finished job."""
    from scheduler.service import finalize_job

    return finalize_job(_scheduler(), job)
