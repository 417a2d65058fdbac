"""Duplicate delivery of the same task, and an item that kills its worker every time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

from tests.data import image_bytes
from tests.reliability.helpers import (
    assert_exact,
    rank,
    simple_lines,
    start_job,
    wait_done,
)
from tests.services import Cluster, wait_for

N = 6


def test_same_task_delivered_twice_concurrently(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, chunk_size="2")
    try:
        job, _ = start_job(c, s3, vbucket, N, 256, worker=False)
        r = c.redis.client()
        wait_for(lambda: r.llen("capvst.stylize") == N // 2, 30, "the job's tasks to be queued")
        # duplicate every message at the broker: same task id and body, a new delivery tag,
        # each copy right behind its original so two workers take them at the same time
        originals = list(reversed(r.lrange("capvst.stylize", 0, -1)))  # in consumption order
        r.delete("capvst.stylize")
        for raw in originals:
            copy = json.loads(raw)
            copy["properties"]["delivery_tag"] = str(uuid.uuid4())
            r.lpush("capvst.stylize", raw)
            r.lpush("capvst.stylize", json.dumps(copy))
        assert r.llen("capvst.stylize") == N
        c.worker("w1")
        c.worker("w2")
        st = wait_done(c, job, timeout=180)
        assert (st["total"], st["succeeded"], st["skipped"], st["failed"]) == (N, N, 0, 0)
        rows = assert_exact(s3, vbucket, "out", job, N)
        assert len({row["worker"].split("@")[0] for row in rows}) >= 1
        # both workers really ran the duplicated tasks
        logs = c.procs[1].log() + c.procs[2].log()
        assert logs.count("Task capvst.stylize[") >= N  # received lines: every copy ran
    finally:
        c.stop()


def _poison_killer(c: Cluster, job: str, line: int, worker, stop: threading.Event,
                   kills: list[int]) -> None:
    """Kill the worker's pool process whenever a run starts the poison line (a crash every
    time: segfault, OOM killer, a native library abort all look like this from outside)."""
    r = c.redis.client()
    killed: set[str] = set()
    seen: dict[str, float] = {}
    while not stop.is_set():
        for key in r.scan_iter("capvst:lease:*"):
            lease = r.hgetall(key)
            token = lease.get("token", "")
            if (lease.get("job") != job or token in killed
                    or str(line) not in lease.get("lines", "").split(",")):
                continue
            # the line kills its worker once the run is past its start-up bookkeeping (a
            # run that failed the line up front, having counted its deaths, never runs it)
            first = seen.setdefault(token, time.monotonic())
            deaths = int(r.hget(f"capvst:job:{job}:deaths", str(line)) or 0)
            if time.monotonic() - first < 1.0 or deaths >= 3 or rank(c, job, line) != 0:
                continue
            killed.add(token)
            for pid in worker.children():
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
        stop.wait(0.02)


def test_poison_item_fails_after_bounded_deliveries(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, chunk_size="1", max_deliveries="3")
    stop = threading.Event()
    try:
        # the poison line is a larger image, so that each run of it lasts seconds: long
        # enough for the killer to strike while it is on the device, however fast the model
        s3.put_object(Bucket=vbucket, Key="in/big.jpg",
                      Body=image_bytes((1024, 768), seed=7, fmt="JPEG"))
        lines = simple_lines(N)
        lines[2].update(content="big.jpg", max_size=1024)
        job, w1 = start_job(c, s3, vbucket, N, 192, lines=lines)
        kills: list[int] = []
        killer = threading.Thread(target=_poison_killer, args=(c, job, 3, w1, stop, kills),
                                  daemon=True)
        killer.start()
        st = wait_done(c, job, timeout=240)
        assert (st["succeeded"], st["failed"]) == (N - 1, 1), st
        rows = assert_exact(s3, vbucket, "out", job, N, allowed=("succeeded", "failed"))
        poison = rows[2]
        assert poison["status"] == "failed" and poison["error"]["code"] == "model_error"
        assert "died 3 times" in poison["error"]["message"]
        assert len(kills) == 3
        assert w1.proc.poll() is None  # the worker itself lives on
    finally:
        stop.set()
        c.stop()
