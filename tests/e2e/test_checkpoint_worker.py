"""Workers run as production runs them: checkpoint files, default thread settings.

A worker that loaded its checkpoints in the Celery parent before forking the pool used to
block forever in the first forward pass (the parent's OpenMP pool does not survive the fork).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.reliability.helpers import put_inputs, put_manifest, report, simple_lines, submit
from tests.reliability.helpers import wait_done as wait_job
from tests.services import Cluster

pytestmark = pytest.mark.slow


def test_parallel_op_in_parent_deadlocks_a_forked_child():
    """The cause, shown directly: a large parallel copy in a parent (what load_state_dict
    does) makes a forked child's first parallel region block; without it the child runs."""
    script = textwrap.dedent("""
        import os, signal, sys, torch
        if sys.argv[1] == "copy":
            torch.zeros(4_000_000).copy_(torch.ones(4_000_000))
        pid = os.fork()
        if pid == 0:
            signal.alarm(15)
            torch.nn.Conv2d(8, 8, 3)(torch.randn(1, 8, 256, 256)).sum()
            os._exit(0)
        print(os.waitpid(pid, 0)[1])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}
    statuses = {}
    for case in ("none", "copy"):
        out = subprocess.run([sys.executable, "-c", script, case], capture_output=True,
                             text=True, timeout=60, env=env, check=True)
        statuses[case] = int(out.stdout.split()[-1])
    if os.cpu_count() == 1:
        pytest.skip("one CPU: OpenMP starts no thread pool, nothing to deadlock")
    assert statuses["none"] == 0
    assert os.WIFSIGNALED(statuses["copy"]) and os.WTERMSIG(statuses["copy"]) == 14


def test_a_dozen_items_through_a_worker_with_checkpoints(tmp_path, moto_server, s3, bucket):
    c = Cluster(tmp_path, moto_server.url)
    assert not any(k in c.env for k in ("CAPVST_TORCH_THREADS", "OMP_NUM_THREADS"))
    try:
        put_inputs(s3, bucket, 12, size=64)
        lines = simple_lines(12)
        for line in lines[6:]:
            line["mode"] = "artistic"
        manifest = put_manifest(s3, bucket, lines)
        c.scheduler().wait_ready()
        c.worker("w1").wait_ready()
        job = submit(c, manifest, f"s3://{bucket}/out", "--max-size", "64")
        st = wait_job(c, job, timeout=240)
        assert st["state"] == "done" and st["succeeded"] == 12, st
        rows = report(s3, bucket, "out", job)
        assert [r["status"] for r in rows] == ["succeeded"] * 12
        assert [r["model"] for r in rows] == (
            [c.model_ids["photorealistic"]] * 6 + [c.model_ids["artistic"]] * 6)
    finally:
        c.stop()


def test_a_worker_without_checkpoint_refuses_to_start(tmp_path):
    """Fail closed: no checkpoint and no CAPVST_ALLOW_UNTRAINED, no worker (and no item
    quietly computed by an untrained network)."""
    c = Cluster(tmp_path, None, untrained=True, worker_modes="photorealistic")
    try:
        t0 = time.monotonic()
        w = c.worker("w1")
        code = w.proc.wait(timeout=90)
        elapsed = time.monotonic() - t0
        log = w.log()
        assert code != 0, log[-2000:]
        assert "CAPVST_ALLOW_UNTRAINED" in log and "CAPVST_CHECKPOINT_PHOTOREALISTIC" in log
        assert " ready." not in log
        assert elapsed < 30, f"the refusal took {elapsed:.1f} s"
    finally:
        c.stop()


def test_untrained_network_on_purpose(tmp_path, moto_server, s3, bucket):
    """With CAPVST_ALLOW_UNTRAINED=1 a worker without checkpoints serves the seeded
    untrained network, and every place a user looks says so."""
    c = Cluster(tmp_path, moto_server.url, untrained=True, allow_untrained="1")
    try:
        put_inputs(s3, bucket, 2, size=64)
        manifest = put_manifest(s3, bucket, simple_lines(2))
        c.scheduler().wait_ready()
        w = c.worker("w1").wait_ready()
        proc = c.submit(manifest, "--output", f"s3://{bucket}/out", "--max-size", "64",
                        "--wait")
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().splitlines()[0]
        assert "UNTRAINED" in proc.stderr  # the submit summary
        st = wait_job(c, job)
        assert st["succeeded"] == 2 and st["untrained"] is True
        assert "UNTRAINED" in c.capvst("status", job).stdout
        assert "UNTRAINED" in c.capvst("report", job).stdout
        assert {r["model"] for r in report(s3, bucket, "out", job)} == {"untrained"}
        summary = json.loads(s3.get_object(Bucket=bucket, Key=f"out/_capvst/{job}/summary.json")
                             ["Body"].read())
        assert summary["untrained"] is True and summary["models"] == {"untrained": 2}
        page = s3.get_object(Bucket=bucket, Key=f"out/_capvst/{job}/index.html")["Body"].read()
        assert b'id="untrained"' in page and b"UNTRAINED model" in page
        assert "UNTRAINED" in w.log() and "CAPVST_ALLOW_UNTRAINED is set" in w.log()
        assert "has no password" in w.log()  # the test Redis has none: the worker says so
    finally:
        c.stop()
