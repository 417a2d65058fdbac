"""Tasks past their time limit and out of memory: the item fails, the worker lives on."""

from __future__ import annotations

import sys

from tests.data import image_bytes
from tests.reliability.helpers import (
    assert_exact,
    put_inputs,
    put_manifest,
    report,
    simple_lines,
    submit,
    wait_done,
)
from tests.services import Cluster


def test_task_slower_than_its_time_limit(tmp_path, moto_server, s3, vbucket):
    # limits far from both sides: small items take well under a second, the huge one minutes
    c = Cluster(tmp_path, moto_server.url, task_time_limit="10", visibility_timeout="20",
                chunk_size="2")
    try:
        put_inputs(s3, vbucket, 4, size=96)
        s3.put_object(Bucket=vbucket, Key="in/huge.png", Body=image_bytes((2400, 2400), seed=3))
        lines = simple_lines(4)
        lines.insert(1, {"content": "huge.png", "style": "s1.png", "max_size": 2400})
        manifest = put_manifest(s3, vbucket, lines)
        c.scheduler().wait_ready()
        w1 = c.worker("w1").wait_ready()
        job = submit(c, manifest, f"s3://{vbucket}/out", "--max-size", "96")
        st = wait_done(c, job, timeout=180)
        assert (st["succeeded"], st["failed"]) == (4, 1), [
            (r["line"], r["status"], r["error"], r["seconds"])
            for r in report(s3, vbucket, "out", job)]
        rows = assert_exact(s3, vbucket, "out", job, 5, allowed=("succeeded", "failed"))
        slow = rows[1]
        assert slow["status"] == "failed" and slow["error"]["code"] == "timeout", slow
        assert w1.proc.poll() is None
        # the same worker went on to finish the items queued after the slow one
        assert all(r["worker"].startswith("w1@") for r in rows if r["status"] == "succeeded")
    finally:
        c.stop()


def test_out_of_memory_fails_the_item_not_the_worker(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, chunk_size="1", max_pixels="50000000")
    try:
        put_inputs(s3, vbucket, 3, size=96)
        s3.put_object(Bucket=vbucket, Key="in/big.png", Body=image_bytes((2800, 2800), seed=4))
        lines = simple_lines(3)
        lines.insert(1, {"content": "big.png", "style": "s0.png", "max_size": 2800})
        manifest = put_manifest(s3, vbucket, lines)
        c.scheduler().wait_ready()
        # a 2.5 GiB address-space limit: small images fit, a 2800x2800 latent does not
        limit = str(int(2.5 * 2**30))
        w1 = c._start("w1", ["prlimit", f"--as={limit}", sys.executable, "-m", "capvst",
                             "worker", "-n", "w1@%h", "--loglevel", "INFO"], None).wait_ready()
        job = submit(c, manifest, f"s3://{vbucket}/out", "--max-size", "96")
        st = wait_done(c, job, timeout=180)
        assert (st["succeeded"], st["failed"]) == (3, 1), st
        rows = assert_exact(s3, vbucket, "out", job, 4, allowed=("succeeded", "failed"))
        big = rows[1]
        assert big["error"]["code"] == "model_error" and "out of memory" in big["error"][
            "message"], big
        assert big["attempts"] == 1  # an explicit policy: no retry loop, no crash loop
        assert w1.proc.poll() is None
    finally:
        c.stop()
