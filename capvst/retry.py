"""Retrying transient faults with exponential backoff and jitter."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import TransientError

T = TypeVar("T")


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (0-based): doubling, capped, jittered to
    between half and all of it so that many clients do not retry in step."""
    top = min(cap, base * (2 ** attempt))
    return random.uniform(top / 2, top)


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
