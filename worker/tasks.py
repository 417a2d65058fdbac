"""The stylize task (queue ``capvst.stylize``) and the worker process's life cycle.

- Before the fork (the Celery parent): the checkpoints are proven loadable in a separate
  interpreter; the parent itself runs no PyTorch, opens no CUDA and keeps no connection
  (docs/ARCHITECTURE.md, "Before the fork").
- After the fork (each pool process): one :class:`~worker.context.WorkerContext` with the
  models on the device, the job store and the pipeline's thread pools.
- Per task: a lease kept alive while the chunk runs, the pipeline
  (:class:`~worker.pipeline.ChunkRunner`), and the hand-back rules: a soft time limit sends
  the unfinished items again; bookkeeping that cannot proceed (Redis refusing writes, the
  broker refusing a publish) hands the whole message back to the queue; nothing is
  acknowledged without its items' results.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import tempfile
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery import Task
from celery import signals as celery_signals
from celery.exceptions import Reject
from celery.worker.request import Request

from capvst.broker import GUARDED_STRATEGY, Queues, StylizePayload, TaskNames, sender
from capvst.errors import CapvstError
from capvst.heartbeat import Heartbeat
from capvst.retry import is_transient_infrastructure

from . import app
from .context import WorkerContext, build_context
from .pipeline import ChunkOutcome, ChunkRunner, HandBack

log = logging.getLogger(__name__)


class Process:
    """This pool process's context, built once at process start."""

    role: str | None = None  # decided in the parent, inherited by the pool processes
    #: a file a pool process creates when it cannot start; the parent then exits non-zero
    failed_flag: str | None = None
    metrics_on = False  # the parent serves /metrics (CAPVST_METRICS_PORT)
    ctx: WorkerContext | None = None

    @classmethod
    def context(cls) -> WorkerContext:
        """The context (built on first use outside a worker, e.g. in tests)."""
        if cls.ctx is None:
            cls.ctx = build_context(app.conf.capvst_settings, sender(app), cls.metrics_on)
        return cls.ctx


@celery_signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    if sender is None or sender.app is not app:
        return  # another app's worker in this interpreter
    queues = sender.app.amqp.queues
    names = set((queues.consume_from or queues).keys())
    Process.role = "stylize" if Queues.STYLIZE.value in names else "other"
    if Process.role != "stylize":
        return
    from capvst.jobs import redis_url_has_password

    s = app.conf.capvst_settings
    if not redis_url_has_password(s.broker_url):
        log.warning("CAPVST_BROKER_URL has no password: anyone who can reach this Redis can "
                    "read and change every job (docs/SECURITY.md)")
    # A missing or bad checkpoint stops the worker's start, loudly, rather than failing
    # every item or, worse, serving an untrained network that looks like success. The load
    # check runs in a separate interpreter so that this parent starts no OpenMP pool, CUDA
    # context or S3 connection that the forked pool processes would inherit broken.
    # Celery only logs exceptions from signal handlers, so leave with SystemExit.
    from capvst import untrained_warning
    from capvst.preflight import check_models_isolated, require_checkpoints

    try:
        untrained = require_checkpoints(s)
        for mode in untrained:
            log.critical("CAPVST_ALLOW_UNTRAINED is set: %s", untrained_warning(mode))
        if len(untrained) < len(s.modes):
            for name, model_id in check_models_isolated(s).items():
                log.info("checked %s model %s", name, model_id)
    except CapvstError as exc:
        log.critical("capvst worker cannot start: %s", exc.message)
        raise SystemExit(f"capvst worker cannot start: {exc.message}") from None
    fd, Process.failed_flag = tempfile.mkstemp(prefix="capvst-worker-", suffix=".failed")
    os.close(fd)
    os.unlink(Process.failed_flag)
    atexit.register(_exit_failed, Process.failed_flag)
    if s.metrics_port:
        from capvst import metrics

        metrics.serve(s.metrics_port)  # before the fork: the pool processes write there
        Process.metrics_on = True


def _exit_failed(flag: str) -> None:
    """At the parent's exit: leave with status 1 when a pool process could not start (the
    warm shutdown it asked for would otherwise end with status 0, and a supervisor would
    take the stop for a normal one)."""
    if os.path.exists(flag):
        os.unlink(flag)
        logging.shutdown()
        os._exit(1)


@celery_signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    s = app.conf.capvst_settings
    if Process.metrics_on and sender is not None and sender.app is app:
        # said here: Celery's logging is not set up yet when worker_init runs
        log.info("Prometheus metrics on port %d at /metrics", s.metrics_port)


@celery_signals.worker_process_shutdown.connect
def _process_shutdown(**_: Any) -> None:
    if Process.metrics_on:
        from capvst import metrics

        metrics.process_exited()


@celery_signals.worker_process_init.connect
def _process_init(**_: Any) -> None:
    if Process.role != "stylize":
        return
    try:
        Process.context()
    except Exception as exc:
        # a process that cannot use its device must not drain the queue with failures:
        # stop the whole worker (warm shutdown hands back what it holds)
        log.critical("capvst worker cannot start: stylize process failed (%s); stopping the "
                     "worker", exc)
        if Process.failed_flag:
            with open(Process.failed_flag, "w") as fh:
                fh.write(str(exc))
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)


def _note_death(task_id: str) -> None:
    """Mark the latest run of ``task_id`` dead, so its next run charges the lines it had in
    flight. Runs in the parent: a short-lived connection, closed before returning, so that no
    socket is inherited by the pool process forked next."""
    try:
        from capvst.jobs import JobStore, connect_settings

        client = connect_settings(app.conf.capvst_settings, retry_seconds=4)
        try:
            JobStore(client).mark_dead(task_id)
        finally:
            client.close()
    except Exception:  # Redis away: the run's lease runs out by itself
        log.warning("could not note the death of task %s", task_id)


class StylizeRequest(Request):
    """Celery's request, noting when the pool process running it died (Celery requeues the
    message then without calling the task's failure handlers)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = exc_info.exception
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, (SystemExit, KeyboardInterrupt))
            and not (self._already_cancelled or self._already_revoked))
        if lost:
            _note_death(self.id)
        return super().on_failure(exc_info, send_failed_event, return_ok)


class StylizeTask(Task):
    """The guarded strategy in front of the consumer, and requests that note dead pool
    processes."""

    Strategy = GUARDED_STRATEGY
    Request = StylizeRequest


@app.task(name=TaskNames.STYLIZE.value, bind=True, base=StylizeTask, shared=False)
def stylize(self: Task, job: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stylize a chunk of one job's items."""
    payload = StylizePayload.model_validate({"job": job, "items": items})
    ctx = Process.context()
    s = ctx.settings
    task_id = self.request.id or "local"
    worker = self.request.hostname or ctx.name
    started = time.time()
    soft_deadline = time.monotonic() + s.soft_time_limit - 1.0
    lines = [i.line for i in payload.items]
    try:
        with Heartbeat(ctx.jobs, task_id, payload.job, lines,
                       items=[i.model_dump() for i in payload.items],
                       deadline=started + s.task_time_limit) as hb:
            runner = ChunkRunner(ctx, payload.job, payload.items, task_id, worker, hb,
                                 soft_deadline)
            runner.passthrough = (SoftTimeLimitExceeded,)
            try:
                outcome = runner.run()
            except SoftTimeLimitExceeded:
                chunks = runner.on_soft_timeout()
                runner.flush(force=True)
                for rest in chunks:
                    ctx.send(TaskNames.STYLIZE.value,
                             dict(job=payload.job, items=[i.model_dump() for i in rest]),
                             f"job={payload.job} items={len(rest)} (after a soft timeout)")
                outcome = runner.outcome
        return outcome.as_dict()
    except HandBack as exc:
        _hand_back(task_id, str(exc), s.retry_backoff_max)
    except Exception as exc:
        if is_transient_infrastructure(exc):
            _hand_back(task_id, f"{type(exc).__name__}: {exc}", s.retry_backoff_max)
        # a fault of our own: the chunk's unfinished items fail with it rather than vanish
        # with an acknowledged message (or loop through the queue for ever)
        log.exception("task %s: internal error", task_id)
        try:
            return _fail_unfinished(ctx, payload, f"internal error: {type(exc).__name__}: "
                                                  f"{exc}")
        except Exception:
            _hand_back(task_id, "could not record the internal error", s.retry_backoff_max)
    raise AssertionError("unreachable")


def _hand_back(task_id: str, why: str, pause: float) -> None:
    """Give the message back to the queue: nothing is acknowledged without its results (if
    Redis refuses even that, the message stays unacknowledged and the reconciler restores
    it once this run's lease has run out)."""
    log.warning("task %s: handing the chunk back: %s", task_id, why)
    time.sleep(min(5.0, pause))
    raise Reject(why, requeue=True)


def _fail_unfinished(ctx: WorkerContext, payload: StylizePayload, message: str
                     ) -> dict[str, Any]:
    from capvst.results import ItemResult

    ranks = ctx.jobs.ranks(payload.job, [i.line for i in payload.items])
    failures = [ItemResult.of_item(i, "failed", code="model_error", message=message,
                                   worker=ctx.name, model=ctx.model_id(i.mode))
                for i, r in zip(payload.items, ranks) if r == 0]
    _changed, due = ctx.jobs.record(payload.job, failures)
    for r in failures:
        ctx.metrics.item(r.mode, r.status, r.code)
    if due:
        ctx.send(TaskNames.FINALIZE.value, {"job": payload.job}, f"job={payload.job}")
    outcome = ChunkOutcome(items=len(payload.items), processed=len(failures),
                           failed=len(failures), note=message,
                           codes={"model_error": len(failures)} if failures else {})
    return outcome.as_dict()
