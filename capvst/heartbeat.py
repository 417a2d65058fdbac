"""A task run's lease, kept alive by a background thread while the run lives.

The reconciler hands back the message (or the unfinished items) of a task whose run stopped
renewing its lease; the next run of the same task learns from the previous lease what a dead
run had in flight. Renewal is a PEXPIRE, which Redis accepts even when it is out of memory,
so a live task is never mistaken for a dead one while Redis is full.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from .jobs import JobStore, Lease

log = logging.getLogger(__name__)


class Heartbeat:
    """``with Heartbeat(jobs, task_id, job, lines) as hb:`` holds the lease for the block."""

    def __init__(self, jobs: JobStore, task_id: str, job: str, lines: Sequence[int] = (), *,
                 items: Sequence[dict[str, Any]] | None = None, isolated: bool = False,
                 deadline: float | None = None) -> None:
        self.jobs = jobs
        self.task_id = task_id
        self.job = job
        self.token = secrets.token_hex(8)
        self.previous: Lease | None = None
        self._args = dict(isolated=isolated, items=items, deadline=deadline)
        self._lines = list(lines)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self.previous = self.jobs.lease_take(self.task_id, self.token, self.job, self._lines,
                                             **self._args)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.task_id[:8]}",
                                        daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        period = max(0.5, self.jobs.lease_seconds / 4)
        while not self._stop.wait(period):
            try:
                self.jobs.lease_renew(self.task_id, self.token)
            except Exception as exc:  # Redis away: keep trying; the lease covers a blip
                log.debug("lease renewal of %s failed: %s", self.task_id, exc)

    def in_flight(self, lines: Sequence[int]) -> None:
        """Record which lines the run has in flight now (best effort)."""
        self._lines = list(lines)
        try:
            self.jobs.lease_lines(self.task_id, self._lines)
        except Exception as exc:
            log.debug("could not update the lease of %s: %s", self.task_id, exc)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.jobs.lease_drop(self.task_id, self.token)
        except Exception as err:  # the lease then expires by itself
            log.debug("could not drop the lease of %s: %s", self.task_id, err)
