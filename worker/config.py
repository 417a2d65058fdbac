"""The Celery application and its configuration (DESIGN.md §7).

Everything that crosses the broker is JSON. Stylize tasks are acknowledged only after they
finish and are handed back if their worker dies, each worker process reserves one task at a
time, and the visibility timeout exceeds the hard time limit so a running task is never given
to a second worker.
"""

from __future__ import annotations

from enum import Enum

from celery import Celery
from kombu import Queue

from capvst.jobs import sentinel_client_options
from capvst.settings import Settings


class Queues(str, Enum):
    """Queue names, in one place."""

    STYLIZE = "capvst.stylize"
    SCHEDULE = "capvst.schedule"


class TaskNames(str, Enum):
    """Task names as Flower and the broker show them."""

    STYLIZE = "capvst.stylize"
    EXPAND = "capvst.expand"
    FINALIZE = "capvst.finalize"


def transport_options(settings: Settings) -> dict[str, object]:
    """Redis transport options: the visibility timeout, and a restore sweep frequent enough
    that a lost worker's task comes back soon after the timeout passes."""
    vt = settings.visibility_timeout
    opts: dict[str, object] = {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(10, vt // 10)),
        "unacked_restore_throttle": 1 if vt < 600 else 10,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }
    if settings.uses_sentinel:  # sentinel://h1:26379;sentinel://h2:26379 (Redis Sentinel)
        opts["master_name"] = settings.sentinel_master
        opts["sentinel_kwargs"] = sentinel_client_options(settings.sentinel_password)
    return opts


def create_app(settings: Settings, include: tuple[str, ...] = ("worker.tasks",)) -> Celery:
    """A configured Celery app for ``settings``."""
    app = Celery("capvst", broker=settings.broker_url, include=list(include))
    opts = transport_options(settings)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        broker_transport_options=opts,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_proc_alive_timeout=180,
        worker_hijack_root_logger=False,
        task_default_queue=Queues.STYLIZE.value,
        task_queues=(Queue(Queues.STYLIZE.value),),
        task_routes={
            TaskNames.EXPAND.value: {"queue": Queues.SCHEDULE.value},
            TaskNames.FINALIZE.value: {"queue": Queues.SCHEDULE.value},
        },
        task_create_missing_queues=True,
        worker_enable_remote_control=True,
    )
    app.conf.capvst_settings = settings
    return app
