"""Object-storage faults through a fault-injecting proxy in front of the S3 server."""

from __future__ import annotations

from tests.faultproxy import FaultProxy
from tests.reliability.helpers import (
    assert_exact,
    start_job,
    wait_done,
)
from tests.services import Cluster

N = 6


def test_transient_faults_are_retried_until_success(tmp_path, moto_server, s3, vbucket):
    proxy = FaultProxy(moto_server.port, rate=0.3, seed=7).start()
    c = Cluster(tmp_path, proxy.url, chunk_size="2", s3_max_attempts="3")
    try:
        job, _ = start_job(c, s3, vbucket, N, 96)
        st = wait_done(c, job, timeout=240)
        assert (st["succeeded"], st["failed"]) == (N, 0), st
        assert_exact(s3, vbucket, "out", job, N)
        # the faults really happened, of every kind
        assert all(proxy.counts[k] > 0 for k in ("slowdown", "internal", "reset")), \
            proxy.counts
    finally:
        c.stop()
        proxy.stop()


def test_persistent_fault_fails_one_item_with_storage_error(tmp_path, moto_server, s3,
                                                            vbucket):
    # every request for one content image fails; everything else is healthy
    proxy = FaultProxy(moto_server.port, always=r"/in/c2\.jpg").start()
    c = Cluster(tmp_path, proxy.url, chunk_size="2", s3_max_attempts="2", task_max_retries="2")
    try:
        job, _ = start_job(c, s3, vbucket, N, 96)
        st = wait_done(c, job, timeout=240)
        assert (st["succeeded"], st["failed"]) == (N - 1, 1), st
        rows = assert_exact(s3, vbucket, "out", job, N, allowed=("succeeded", "failed"))
        bad = rows[2]
        assert bad["status"] == "failed" and bad["error"]["code"] == "storage_error"
        assert bad["attempts"] == 3  # the first try and two retries, each with backoff
        assert "gave up after 3 attempts" in bad["error"]["message"]
        assert proxy.counts_total() >= 6  # botocore's own retries inside each attempt
    finally:
        c.stop()
        proxy.stop()
