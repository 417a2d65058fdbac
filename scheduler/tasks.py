"""The scheduler's Celery tasks (queue ``capvst.schedule``): thin wrappers over
:mod:`scheduler.service`, plus the per-process context and the reconciler thread.

A step that raises is not retried by Celery: its lease runs out and the reconciler sends it
again (the retry policy, :mod:`capvst.retry`). Malformed messages are dropped by the guard
in front of the consumer (:func:`capvst.broker.guarded_strategy`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery import signals as celery_signals

from capvst import metrics
from capvst.broker import (
    GUARDED_STRATEGY,
    ExpandPayload,
    FinalizePayload,
    Queues,
    TaskNames,
    sender,
)
from capvst.heartbeat import Heartbeat
from capvst.jobs import JobStore, connect_settings
from capvst.metrics import SchedulerMetrics
from capvst.settings import Settings
from capvst.storage import Storage

from .app import app
from .reconciler import Reconciler
from .service import Context, expand_slice, finalize_job

log = logging.getLogger(__name__)


class SchedulerContext:
    """Per-process resources, built once when the pool process starts."""

    current: Context | None = None
    reconciler: Reconciler | None = None
    metrics_on = False  # decided in the parent (CAPVST_METRICS_PORT), inherited by the fork

    @classmethod
    def get(cls) -> Context:
        """This process's context (built on first use outside a worker, e.g. in tests)."""
        if cls.current is None:
            cls.current = build_context(app.conf.capvst_settings)
        return cls.current


def build_context(s: Settings) -> Context:
    """Storage, job store and publisher for one scheduler process."""
    jobs = JobStore(connect_settings(s), int(s.job_ttl_days * 86400), s.lease_seconds)
    return Context(s, Storage(s), jobs, sender(app),
                   lambda: int(jobs.r.llen(Queues.STYLIZE.value)),  # type: ignore[arg-type]
                   SchedulerMetrics(SchedulerContext.metrics_on))


@contextmanager
def _channel() -> Iterator[Any]:
    with app.connection_for_write() as conn:
        yield conn.default_channel


@celery_signals.worker_init.connect
def _scheduler_init(sender: Any = None, **_: Any) -> None:
    if sender is None or sender.app is not app:
        return
    from capvst.jobs import redis_url_has_password

    s = app.conf.capvst_settings
    if not redis_url_has_password(s.broker_url):
        log.warning("CAPVST_BROKER_URL has no password: anyone who can reach this Redis can "
                    "read and change every job (docs/SECURITY.md)")
    if s.metrics_port:
        # before the fork: the pool processes write to the folder this sets up
        metrics.serve(s.metrics_port, [metrics.JobsCollector(lambda: _count_jobs(s))])
        SchedulerContext.metrics_on = True


@celery_signals.worker_ready.connect
def _scheduler_ready(sender: Any = None, **_: Any) -> None:
    if SchedulerContext.metrics_on and sender is not None and sender.app is app:
        # said here: Celery's logging is not set up yet when worker_init runs
        log.info("Prometheus metrics on port %d at /metrics",
                 app.conf.capvst_settings.metrics_port)


def _count_jobs(s: Settings) -> dict[str, int]:
    """Jobs by state, over a connection of its own that is closed before returning (it runs
    in the parent's metrics thread, and the parent keeps no connection open)."""
    client = connect_settings(s, retry_seconds=2)
    try:
        return JobStore(client).count_by_state()
    finally:
        client.close()


@celery_signals.worker_process_shutdown.connect
def _process_shutdown(**_: Any) -> None:
    if SchedulerContext.metrics_on:
        metrics.process_exited()


@celery_signals.worker_process_init.connect
def _process_init(**_: Any) -> None:
    ctx = SchedulerContext.get()
    rec = Reconciler(ctx, _channel)
    SchedulerContext.reconciler = rec
    threading.Thread(target=rec.run_forever, name="reconciler", daemon=True).start()
    log.info("scheduler process ready; reconciler every %.0f s", ctx.settings.reconcile_interval)


class SchedulerTask(Task):
    """Base of the scheduler's tasks: the guarded strategy, no Celery-level retries."""

    Strategy = GUARDED_STRATEGY


@app.task(name=TaskNames.EXPAND.value, bind=True, base=SchedulerTask, shared=False)
def expand(self: Task, job: str, epoch: int, offset: int, line: int) -> str:
    """Expand one slice of a job's manifest."""
    p = ExpandPayload(job=job, epoch=epoch, offset=offset, line=line)
    ctx = SchedulerContext.get()
    with Heartbeat(ctx.jobs, self.request.id or f"expand-{p.job}", p.job):
        return expand_slice(ctx, p.job, p.epoch, p.offset, p.line)


@app.task(name=TaskNames.FINALIZE.value, bind=True, base=SchedulerTask, shared=False)
def finalize(self: Task, job: str) -> str:
    """Write the report of a finished job."""
    p = FinalizePayload(job=job)
    ctx = SchedulerContext.get()
    with Heartbeat(ctx.jobs, self.request.id or f"finalize-{p.job}", p.job):
        return finalize_job(ctx, p.job)
