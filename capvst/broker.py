"""What the scheduler and the workers share about the broker: the Celery app factory, queue
and task names, message payloads, and a guard that drops malformed messages.

This is the one module both services import (DESIGN.md §2, §7). Everything that crosses the
broker is JSON; tasks are acknowledged late and handed back if their process dies; each
worker process reserves one task at a time; the visibility timeout exceeds the hard time
limit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .manifest import Item
from .settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


class Queues(str, Enum):
    """Queue names, in one place."""

    STYLIZE = "capvst.stylize"
    SCHEDULE = "capvst.schedule"


class TaskNames(str, Enum):
    """Task names as Flower and the broker show them."""

    STYLIZE = "capvst.stylize"
    EXPAND = "capvst.expand"
    FINALIZE = "capvst.finalize"
    VIDEO_PLAN = "capvst.video.plan"
    VIDEO_SEGMENT = "capvst.video.segment"
    VIDEO_JOIN = "capvst.video.join"


class StylizePayload(BaseModel):
    """Arguments of ``capvst.stylize``: a chunk of one job's items."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(min_length=1, max_length=128)
    items: list[Item] = Field(min_length=1, max_length=10_000)


class ExpandPayload(BaseModel):
    """Arguments of ``capvst.expand``: one slice of a job's manifest."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(min_length=1, max_length=128)
    epoch: int = Field(ge=0)
    offset: int = Field(ge=0)
    line: int = Field(ge=1)


class FinalizePayload(BaseModel):
    """Arguments of ``capvst.finalize``."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(min_length=1, max_length=128)


class VideoPlanPayload(BaseModel):
    """Arguments of ``capvst.video.plan``: one video item of a job."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(min_length=1, max_length=128)
    item: Item


class VideoSegmentPayload(BaseModel):
    """Arguments of ``capvst.video.segment``: one segment of a planned video item."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(min_length=1, max_length=128)
    line: int = Field(ge=1)
    index: int = Field(ge=0)


class VideoJoinPayload(BaseModel):
    """Arguments of ``capvst.video.join``: a video item whose segments are all done."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(min_length=1, max_length=128)
    line: int = Field(ge=1)


PAYLOADS: dict[str, type[BaseModel]] = {
    TaskNames.STYLIZE.value: StylizePayload,
    TaskNames.EXPAND.value: ExpandPayload,
    TaskNames.FINALIZE.value: FinalizePayload,
    TaskNames.VIDEO_PLAN.value: VideoPlanPayload,
    TaskNames.VIDEO_SEGMENT.value: VideoSegmentPayload,
    TaskNames.VIDEO_JOIN.value: VideoJoinPayload,
}
ROUTES = {TaskNames.STYLIZE.value: Queues.STYLIZE.value,
          TaskNames.EXPAND.value: Queues.SCHEDULE.value,
          TaskNames.FINALIZE.value: Queues.SCHEDULE.value,
          TaskNames.VIDEO_PLAN.value: Queues.STYLIZE.value,
          TaskNames.VIDEO_SEGMENT.value: Queues.STYLIZE.value,
          TaskNames.VIDEO_JOIN.value: Queues.STYLIZE.value}


def transport_options(settings: Settings) -> dict[str, object]:
    """Redis transport options: the visibility timeout, and a restore sweep frequent enough
    that a lost worker's task comes back soon after the timeout passes."""
    from .jobs import sentinel_client_options

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


def _guard_closed_redis_channel() -> None:
    """Make a Redis channel of a connection that is already closed fail with a connection
    error instead of an ``AttributeError``.

    When the broker drops, Celery's consumer first collects the connection (which detaches
    its transport) and then closes it; closing the default channel tries to hand back the
    unacknowledged messages and needs connection parameters the detached transport no longer
    has. The ``AttributeError`` that follows is not a connection error, so Celery calls it
    unrecoverable and the whole worker stops on a Redis restart. As a connection error it is
    ignored like every other failure of that close; the messages it could not hand back are
    restored by the visibility timeout or by the reconciler (docs/RELIABILITY.md).
    """
    from kombu.transport import redis as kombu_redis

    if getattr(kombu_redis.Channel, "_capvst_guarded", False):
        return
    original = kombu_redis.Channel._connparams

    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection.client is None:
            raise kombu_redis.redis.exceptions.ConnectionError(
                "the broker connection is already closed")
        return original(self, *args, **kwargs)

    channel: Any = kombu_redis.Channel
    channel._connparams = _connparams
    channel._capvst_guarded = True


def create_app(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """A configured Celery app for ``settings`` registering the task modules ``include``."""
    from celery import Celery
    from kombu import Exchange, Queue

    _guard_closed_redis_channel()

    app = Celery("capvst", broker=settings.broker_url, include=list(include))
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
        broker_transport_options=transport_options(settings),
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A running task is not killed when the broker connection drops: it waits for Redis
        # and finishes (a copy restored meanwhile finds its items final). Killing it would
        # make a Redis blip look like an item that kills its worker.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_proc_alive_timeout=180,
        worker_hijack_root_logger=False,
        task_default_queue=Queues.STYLIZE.value,
        # each queue with its own direct exchange: a queue declared without one would be bound
        # to the default exchange and receive the other queue's messages as well
        task_queues=tuple(Queue(q.value, Exchange(q.value, type="direct"), routing_key=q.value)
                          for q in Queues),
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        task_create_missing_queues=True,
        worker_enable_remote_control=True,
    )
    app.conf.capvst_settings = settings
    return app


Sender = Callable[[str, dict[str, Any], str], None]


def sender(app: Celery) -> Sender:
    """A function that publishes a task by name with a readable summary for Flower."""

    def send(name: str, kwargs: dict[str, Any], argsrepr: str) -> None:
        app.send_task(name, kwargs=kwargs, argsrepr="()", kwargsrepr=argsrepr)

    return send


# --- the guard -------------------------------------------------------------------------------

def message_problem(task_name: str, headers: dict[str, Any] | None, payload: Any) -> str | None:
    """Why a decoded message cannot be a valid call of ``task_name``, or None."""
    headers = headers or {}
    if headers.get("task") not in (None, task_name):
        return f"header names task {headers.get('task')!r}"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "no task id"
    if isinstance(payload, (bytes, str)):
        try:
            payload = json.loads(payload)
        except (ValueError, RecursionError):
            return "body is not JSON"
    if not (isinstance(payload, (list, tuple)) and len(payload) == 3
            and isinstance(payload[0], (list, tuple)) and isinstance(payload[1], dict)
            and isinstance(payload[2], (dict, type(None)))):
        return "body is not [args, kwargs, embed]"
    if payload[0]:
        return "positional arguments are not accepted"
    model = PAYLOADS.get(task_name)
    if model is not None:
        try:
            model.model_validate(payload[1])
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "kwargs"
            return f"bad arguments ({where}: {first.get('msg')})"
    return None


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy behind a check: a message that is not a valid call of this
    task is logged and dropped instead of raising inside the consumer, which Celery treats as
    unrecoverable (one such message would stop every worker that receives it)."""
    from celery.worker.strategy import default

    handler = default(task, app, consumer, **kwargs)

    def guarded(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                **kw: Any) -> Any:
        try:
            payload = message.decode() if body is None else body
            problem = message_problem(task.name, message.headers, payload)
        except Exception as exc:  # undecodable in any way is the same verdict
            problem = f"undecodable ({type(exc).__name__}: {str(exc)[:200]})"
        if problem is None:
            try:
                return handler(message, body, ack, reject, callbacks, **kw)
            except Exception as exc:  # Celery would stop the consumer for good
                problem = f"refused by the worker ({type(exc).__name__}: {exc})"
        log.error("dropped a malformed %s message %s: %s", task.name,
                  (message.headers or {}).get("id"), problem)
        try:
            message.reject(requeue=False)
        except Exception:  # already acknowledged, or the connection is gone
            log.debug("could not drop the message", exc_info=True)
        return None

    return guarded


GUARDED_STRATEGY = f"{__name__}:guarded_strategy"
