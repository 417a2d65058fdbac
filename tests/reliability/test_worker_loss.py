"""A worker killed mid-task (node loss) and a warm shutdown: nothing lost, nothing twice."""

from __future__ import annotations

import signal

from tests.reliability.helpers import (
    assert_exact,
    start_job,
    wait_done,
    wait_item_started,
)
from tests.services import Cluster, wait_for

N = 6


def test_sigkill_mid_task_is_redelivered(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, chunk_size="2")
    try:
        job, w1 = start_job(c, s3, vbucket, N, 320)
        victim = wait_item_started(c, job)
        w1.kill_group()  # the whole node: main process and pool child, no warning
        w2 = c.worker("w2").wait_ready()
        st = wait_done(c, job, timeout=120)
        assert (st["total"], st["failed"]) == (N, 0)
        rows = assert_exact(s3, vbucket, "out", job, N, allowed=("succeeded", "skipped"))
        killed = rows[victim - 1]
        # the interrupted item ran again elsewhere (or found its output already complete)
        assert killed["worker"].startswith("w2@")
        assert killed["attempts"] >= 2 or killed["status"] == "skipped"
        assert w2.proc.poll() is None
    finally:
        c.stop()


def test_sigterm_warm_shutdown_finishes_its_task(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, chunk_size="2")
    try:
        job, w1 = start_job(c, s3, vbucket, N, 320)
        busy = wait_item_started(c, job)
        w1.signal(signal.SIGTERM)
        wait_for(lambda: w1.proc.poll() is not None, 60, "w1 to shut down")
        assert w1.proc.returncode == 0, w1.log()[-2000:]
        c.worker("w2").wait_ready()
        st = wait_done(c, job, timeout=120)
        assert (st["succeeded"], st["failed"], st["skipped"]) == (N, 0, 0)
        rows = assert_exact(s3, vbucket, "out", job, N)
        # the item w1 was running when asked to stop was finished by w1, once
        assert rows[busy - 1]["worker"].startswith("w1@")
        assert rows[busy - 1]["attempts"] == 1
    finally:
        c.stop()
