"""The reconciler: the scheduler's periodic repair pass, so no job ever waits for a human or
for the broker's visibility timeout.

One scheduler process at a time is the leader (a Redis lease); every few seconds it:

- copies results from Redis to object storage (the job's result files);
- re-sends the expansion step of a job whose cursor has not moved within its lease (the
  process that owned it died between committing a slice and sending the next step, a publish
  failed, or the slice was throttled);
- re-sends finalize when it was due and has not happened within its lease;
- hands back tasks whose process died: a message still unacknowledged after a grace period
  whose task holds no live lease goes back to its queue; a task that ended without finishing
  its items and without a message left (killed by the hard time limit) has its unfinished
  items sent again;
- forgets index entries of expired jobs.

Every action is idempotent (compare-and-set on the cursor, create-only outputs, results that
count once), so a repair that races the thing it repairs does no harm.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from capvst.broker import Queues, TaskNames
from capvst.jobs import LEADER, JobStore

from .service import Context, drain_inbox, send_expand, send_finalize

log = logging.getLogger(__name__)


class Reconciler:
    """One repair pass per :meth:`tick`; :meth:`run_forever` in a daemon thread."""

    def __init__(self, ctx: Context, channel: Callable[[], Any] | None = None) -> None:
        self.ctx = ctx
        self.channel = channel  # a kombu channel factory for restoring unacked messages
        self.token = secrets.token_hex(8)
        self.last_forget = 0.0
        self._stop = threading.Event()

    @property
    def jobs(self) -> JobStore:
        """The job store."""
        return self.ctx.jobs

    def stop(self) -> None:
        """End :meth:`run_forever`."""
        self._stop.set()

    def run_forever(self) -> None:
        """Tick every ``reconcile_interval`` seconds until stopped; errors are logged."""
        interval = self.ctx.settings.reconcile_interval
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception as exc:  # Redis down or full: try again next time
                log.warning("reconcile pass failed: %s", exc)

    def tick(self) -> bool:
        """One pass if this process is the leader; returns whether it was."""
        s = self.ctx.settings
        if not self.jobs.hold(LEADER, self.token, max(3 * s.reconcile_interval, 10.0)):
            return False
        now = time.time()
        for job in self.jobs.active_jobs():
            try:
                self.job(job, now)
            except Exception as exc:
                log.warning("reconcile job %s: %s", job, exc)
        try:
            self.dead_tasks(now)
        except Exception as exc:
            log.warning("reconcile tasks: %s", exc)
        if now - self.last_forget > 3600:
            self.jobs.forget_expired()
            self.last_forget = now
        return True

    def job(self, job: str, now: float) -> None:
        """Repair one active job."""
        f = self.jobs.fields(job)
        if not f:
            self.jobs.deactivate(job)
            return
        rec = self.jobs.record_of(job)
        state = f.get("state", "queued")
        if rec is not None and state not in ("done", "cancelled") \
                and self.jobs.inbox_length(job):
            drain_inbox(self.ctx, rec)
        lease = self.ctx.settings.lease_seconds
        if f.get("expanded") != "1" and state in ("queued", "running") \
                and float(f.get("expand_at") or 0) < now:
            self.jobs.touch_expansion(job)
            send_expand(self.ctx, job, int(f.get("epoch", 0)), int(f.get("cursor_offset", 0)),
                        int(f.get("cursor_line", 1)), "re-sent")
        due = f.get("finalize_due") == "1" or f.get("refinalize") == "1"
        if due and float(f.get("finalize_at") or 0) < now:
            self.jobs.set(job, finalize_at=now + lease * 10)
            send_finalize(self.ctx, job, "re-sent")
        if state in ("done", "cancelled") and f.get("refinalize") != "1":
            self.jobs.deactivate(job)

    # -- tasks whose process died ----------------------------------------------------------
    def dead_tasks(self, now: float) -> None:
        """Hand back the messages and items of tasks whose process died."""
        grace = self.ctx.settings.lease_seconds
        held = self._restore_unacked(now, grace)
        for task_id, started in self.jobs.leases():
            if task_id in held or now - started < 2 * grace:
                continue
            if self.jobs.alive(str(task_id)):
                continue
            self._orphan(str(task_id), now)

    def _restore_unacked(self, now: float, grace: float) -> set[str]:
        """Restore unacknowledged messages older than ``grace`` whose task is not alive;
        returns the task ids that still have a message (restored or held by a live task)."""
        held: set[str] = set()
        if self.channel is None:
            return held
        from kombu.transport.redis import Mutex, MutexHeld

        r = self.jobs.r
        with self.channel() as ch:
            tags: list[str] = [str(t) for t in r.zrange(  # type: ignore[union-attr]
                ch.unacked_index_key, 0, now - grace, byscore=True)]
            entries = r.hmget(ch.unacked_key, tags) if tags else []
            try:
                with Mutex(ch.client, ch.unacked_mutex_key, ch.unacked_mutex_expire):
                    for tag, raw in zip(tags, entries):
                        info = _message_info(raw)
                        if info is None:
                            continue
                        task_id, eta, queue = info
                        held.add(task_id)
                        if eta is not None and eta > now - grace:
                            continue
                        if queue not in (Queues.STYLIZE.value, Queues.SCHEDULE.value):
                            continue
                        if self.jobs.alive(task_id):
                            continue
                        log.warning("task %s: its process is gone; handing its message back",
                                    task_id)
                        ch.qos.restore_by_tag(tag, leftmost=True)
            except MutexHeld:
                pass
        return held

    def _orphan(self, task_id: str, now: float) -> None:
        """A task run that is not alive and has no message left.

        A run killed by the hard time limit has its message acknowledged by Celery: the
        item(s) it had in flight fail ``timeout`` and its other unfinished items are sent
        again. Other dead runs still have a message (requeued by Celery when the pool
        process died, or restored above) whose next run charges them; a lease without
        items (a scheduler step) is simply dropped.
        """
        lease = self.jobs.lease_of(task_id)
        if lease is None:
            self.jobs.lease_drop(task_id)
            return
        items = self.jobs.lease_items(task_id)
        if items and (lease.deadline is None or now < lease.deadline):
            return  # its message will run again and account for it
        self.jobs.lease_drop(task_id)
        if not items:
            return
        ranks = self.jobs.ranks(lease.job, [int(i["line"]) for i in items])
        rest = [i for i, r in zip(items, ranks) if r == 0]
        if not rest:
            return
        from capvst.manifest import Item
        from capvst.results import ItemResult

        limit = self.ctx.settings.task_time_limit
        failures = [ItemResult.of_item(Item.model_validate(i), "failed", code="timeout",
                                       message=f"killed after the hard time limit of {limit} s")
                    for i in rest if int(i["line"]) in lease.lines]
        if failures:
            _changed, due = self.jobs.record(lease.job, failures)
            if due:
                send_finalize(self.ctx, lease.job)
        rest = [i for i in rest if int(i["line"]) not in lease.lines]
        if rest:
            log.warning("task %s passed its hard time limit; sending its %d unfinished items "
                        "again", task_id, len(rest))
            self.ctx.send(TaskNames.STYLIZE.value, dict(job=lease.job, items=rest),
                          f"job={lease.job} items={len(rest)} (after a hard timeout)")


def _message_info(raw: Any) -> tuple[str, float | None, str] | None:
    """(task id, ETA as a timestamp, queue) of a kombu unacked entry, or None."""
    try:
        payload, _exchange, routing_key = json.loads(raw)
        headers = payload.get("headers") or {}
        task_id = headers.get("id")
        if not isinstance(task_id, str):
            return None
        eta = headers.get("eta")
        when = datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) else None
        return task_id, when, str(routing_key)
    except (TypeError, ValueError, AttributeError):
        return None


__all__ = ["Reconciler"]
