"""Redis restarted in the middle of a job, with and without persistence."""

from __future__ import annotations

import pytest

from tests.reliability.helpers import (
    assert_exact,
    done_count,
    start_job,
    wait_done,
)
from tests.services import Cluster, wait_for

N = 8


def _progressed(c: Cluster, job: str, n: int) -> bool:
    return done_count(c, job) >= n


def test_restart_with_persistence_job_completes(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, persist=True, chunk_size="1")
    try:
        job, _ = start_job(c, s3, vbucket, N, 256)
        wait_for(lambda: _progressed(c, job, 2), 60, "two items to finish")
        c.redis.restart()  # SIGKILL, then start again from the append-only file
        st = wait_done(c, job, timeout=150)
        assert (st["total"], st["failed"]) == (N, 0)
        rows = assert_exact(s3, vbucket, "out", job, N, allowed=("succeeded", "skipped"))
        assert sum(r["status"] == "succeeded" for r in rows) >= N - 1
    finally:
        c.stop()


@pytest.mark.parametrize("restarts", [1])
def test_restart_without_persistence_resume_completes(tmp_path, moto_server, s3, vbucket,
                                                      restarts):
    c = Cluster(tmp_path, moto_server.url, chunk_size="1")
    try:
        job, _ = start_job(c, s3, vbucket, N, 256)
        wait_for(lambda: _progressed(c, job, 3), 60, "three items to finish")
        c.redis.restart()  # everything in Redis is gone: queue, job state
        assert not c.redis.client().exists(f"capvst:job:{job}")
        proc = c.capvst("resume", job, "--output", f"s3://{vbucket}/out", "--wait",
                        timeout=240)
        assert proc.returncode == 0, proc.stderr
        assert "rebuilt" in proc.stderr and "stored results" in proc.stderr
        rows = assert_exact(s3, vbucket, "out", job, N)
        # every item is 'succeeded', also those whose results Redis lost before they were
        # stored: their outputs carry the job and line that wrote them
        assert all(r["status"] == "succeeded" for r in rows)
        st = wait_done(c, job)
        assert (st["total"], st["succeeded"] + st["skipped"], st["failed"]) == (N, N, 0)
    finally:
        c.stop()
