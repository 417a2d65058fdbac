"""The job engine under process deaths, a full Redis and hostile broker messages: every job
finishes by itself, every item exactly once, without ``capvst resume`` and without waiting
for the broker's visibility timeout (left at its default of an hour here)."""

from __future__ import annotations

import threading
import time
import uuid

from kombu import Connection

from tests.reliability.helpers import (
    assert_exact,
    put_inputs,
    put_manifest,
    simple_lines,
    status,
    submit,
    wait_done,
)
from tests.services import Cluster, Proc, wait_for


class Supervisor:
    """Restarts service processes that exit, as Kubernetes or ``restart: always`` would."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.restarts: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for p in list(self.c.procs):
                if p.proc.poll() is not None and not getattr(p, "replaced", False):
                    p.replaced = True  # type: ignore[attr-defined]
                    self.restarts.append(p.name)
                    self.c.procs.append(Proc(f"{p.name}-r{len(self.restarts)}",
                                             list(p.proc.args), self.c.env,  # type: ignore
                                             self.c.folder))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def _expanding(c: Cluster, job: str, past_line: int) -> bool:
    f = c.redis.client().hgetall(f"capvst:job:{job}")
    return int(f.get("cursor_line", 1)) > past_line and f.get("expanded") != "1"


def test_scheduler_killed_mid_expansion_finishes_without_resume(tmp_path, moto_server, s3,
                                                                 vbucket):
    n = 30
    # small slices and a short queue: the expansion takes many steps, so the kill lands
    # between a slice's commit and the next step
    c = Cluster(tmp_path, moto_server.url, chunk_size="2", expand_slice_lines="3",
                max_queued_tasks="2", throttle_seconds="0.5")
    try:
        put_inputs(s3, vbucket, n, size=48)
        manifest = put_manifest(s3, vbucket, simple_lines(n))
        sched = c.scheduler().wait_ready()
        c.worker("w1").wait_ready()
        job = submit(c, manifest, f"s3://{vbucket}/out", "--max-size", "48")
        wait_for(lambda: _expanding(c, job, 6), 120, "the expansion to be under way")
        sched.kill_group()  # SIGKILL: whatever it held is gone with it
        assert _expanding(c, job, 1)
        c.scheduler("scheduler2").wait_ready()
        st = wait_done(c, job, timeout=300)
        assert (st["succeeded"], st["failed"]) == (n, 0), st
        assert_exact(s3, vbucket, "out", job, n)
    finally:
        c.stop()


def test_redis_out_of_memory_for_20_seconds(tmp_path, moto_server, s3, vbucket):
    n = 16
    c = Cluster(tmp_path, moto_server.url, chunk_size="2")
    sup = None
    try:
        put_inputs(s3, vbucket, n, size=64)
        manifest = put_manifest(s3, vbucket, simple_lines(n))
        c.scheduler().wait_ready()
        c.worker("w1").wait_ready()
        job = submit(c, manifest, f"s3://{vbucket}/out", "--max-size", "64")
        r = c.redis.client()
        wait_for(lambda: (status(c, job) or {}).get("done", 0) >= 2, 120, "two items")
        sup = Supervisor(c)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)  # every write that may grow memory is refused
        time.sleep(20)
        r.config_set("maxmemory", 0)
        st = wait_done(c, job, timeout=300)
        assert (st["succeeded"], st["failed"]) == (n, 0), st
        rows = assert_exact(s3, vbucket, "out", job, n)
        assert all(r_["status"] == "succeeded" for r_ in rows)
    finally:
        if sup is not None:
            sup.stop()
        c.stop()


def _publish(c: Cluster, queue: str, task: str, body: object) -> None:
    with Connection(c.redis.url) as conn:
        conn.Producer().publish(body, routing_key=queue, exchange=queue, serializer="json",
                                headers={"task": task, "id": str(uuid.uuid4()), "lang": "py",
                                         "argsrepr": "()", "kwargsrepr": "{}"})


def test_malformed_messages_stop_no_worker_and_no_scheduler(tmp_path, moto_server, s3,
                                                            vbucket):
    c = Cluster(tmp_path, moto_server.url)
    try:
        sched = c.scheduler().wait_ready()
        w1 = c.worker("w1").wait_ready()
        bodies = [[], {}, "x", [[], {"job": "j"}, {}], [[1], {}, {}],
                  [[], {"job": "j", "items": [{"line": "x"}]}, {}],
                  [[], {"job": "j", "epoch": -1, "offset": 0, "line": 1}, {}]]
        for body in bodies:
            _publish(c, "capvst.stylize", "capvst.stylize", body)
            _publish(c, "capvst.schedule", "capvst.expand", body)
            _publish(c, "capvst.schedule", "capvst.finalize", body)
        wait_for(lambda: w1.log().count("dropped a malformed") >= len(bodies), 60,
                 "the worker to drop every malformed message")
        # every body is wrong for capvst.expand; one ({"job": "j"}) is a valid call of
        # capvst.finalize (for a job that does not exist, which it reports and ignores)
        wait_for(lambda: sched.log().count("dropped a malformed") >= 2 * len(bodies) - 1, 60,
                 "the scheduler to drop every malformed message")
        assert w1.proc.poll() is None and sched.proc.poll() is None
        assert "Unrecoverable error" not in w1.log() + sched.log()
        # and they still do their work
        put_inputs(s3, vbucket, 2, size=48)
        manifest = put_manifest(s3, vbucket, simple_lines(2))
        job = submit(c, manifest, f"s3://{vbucket}/out", "--max-size", "48")
        assert wait_done(c, job, timeout=120)["succeeded"] == 2
        assert c.redis.client().llen("capvst.stylize") == 0
    finally:
        c.stop()


def test_redis_blips_do_not_count_as_deaths(tmp_path, moto_server, s3, vbucket):
    n = 6
    # one death would fail an item: Redis restarting under running tasks must not count
    c = Cluster(tmp_path, moto_server.url, persist=True, chunk_size="3", max_deliveries="1")
    try:
        put_inputs(s3, vbucket, n, size=256)
        manifest = put_manifest(s3, vbucket, simple_lines(n))
        c.scheduler().wait_ready()
        c.worker("w1").wait_ready()
        job = submit(c, manifest, f"s3://{vbucket}/out", "--max-size", "256")
        r = c.redis.client()
        wait_for(lambda: r.zcard("capvst:leases") > 0 and r.keys("capvst:lease:*"), 120,
                 "a chunk to be running")
        for _ in range(2):
            c.redis.restart()
            time.sleep(2)
        st = wait_done(c, job, timeout=300)
        assert (st["succeeded"], st["failed"]) == (n, 0), st
        assert_exact(s3, vbucket, "out", job, n)
    finally:
        c.stop()
