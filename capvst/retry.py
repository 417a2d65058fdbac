"""The retry policy, written once as data, and the helpers that apply it.

Layers, from the inside out (no layer multiplies another one's attempts beyond this table):

- one S3 call (5xx, throttling, resets): botocore in standard mode,
  ``CAPVST_S3_MAX_ATTEMPTS`` attempts;
- an item whose S3 calls still failed: the worker, with backoff,
  ``CAPVST_TASK_MAX_RETRIES`` + 1 attempts;
- Redis connection errors: redis-py, with backoff, for about a minute;
- any other bookkeeping error (Redis out of memory, BUSY, a refused publish): the task waits
  with backoff until shortly before its soft time limit, then hands its message back;
- a step of the scheduler (expand a slice, finalize): the reconciler re-sends it once its
  lease runs out, until it succeeds.

Permanent errors (bad image, missing object, invalid item) are never retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import TransientError

T = TypeVar("T")

#: Redis reply prefixes of conditions that pass: out of memory under noeviction, a busy
#: script, a server still loading its data, a replica or a failover in progress.
TRANSIENT_REDIS_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN",
                           "CLUSTERDOWN", "NOREPLICAS")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one kind of fault is retried."""

    attempts: int
    base: float
    cap: float

    def delay(self, attempt: int) -> float:
        """Backoff before retry number ``attempt`` (0-based)."""
        return backoff_delay(attempt, self.base, self.cap)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (0-based): doubling, capped, jittered to
    between half and all of it so that many clients do not retry in step."""
    top = min(cap, base * (2 ** attempt))
    return random.uniform(top / 2, top)


def is_transient_infrastructure(exc: BaseException) -> bool:
    """Whether ``exc`` is a Redis or broker fault worth waiting out (connection loss,
    timeouts, out of memory, busy scripts, failovers)."""
    import redis

    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                        redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).upper().startswith(TRANSIENT_REDIS_REPLIES)
    try:
        from kombu.exceptions import OperationalError
    except ImportError:  # pragma: no cover - kombu comes with celery
        return False
    return isinstance(exc, OperationalError)


def with_retries(fn: Callable[[], T], attempts: int, base: float, cap: float,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``; on a :class:`TransientError` wait and try again, ``attempts`` in all."""
    for attempt in range(attempts):
        try:
            return fn()
        except TransientError:
            if attempt >= attempts - 1:
                raise
            sleep(backoff_delay(attempt, base, cap))
    raise AssertionError("unreachable")


def wait_out(fn: Callable[[], T], deadline: float, policy: RetryPolicy,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` until it stops raising transient infrastructure faults or ``deadline``
    (a ``time.monotonic()`` value) passes; then the last fault propagates."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient_infrastructure(exc):
                raise
            wait = policy.delay(attempt)
            if time.monotonic() + wait >= deadline:
                raise
            sleep(wait)
            attempt += 1
