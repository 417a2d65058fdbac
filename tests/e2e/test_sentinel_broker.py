"""A job through the queue with a sentinel:// broker: the scheduler, a worker and the job
client find the Redis master through a Redis Sentinel, for Celery's queue and the job
state alike."""

from __future__ import annotations

import json

import pytest

from tests.data import image_bytes
from tests.services import cluster

pytestmark = pytest.mark.slow


def test_a_job_through_a_sentinel_broker(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"c{i}.png").write_bytes(image_bytes((40, 32), seed=i))
    (folder / "s.png").write_bytes(image_bytes((32, 32), seed=7))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"content": f"c{i}.png", "style": "s.png"}) + "\n"
                                for i in range(3)))
    with cluster(tmp_path, None, sentinel=True, worker_modes="photorealistic") as c:
        assert c.env["CAPVST_BROKER_URL"].startswith("sentinel://")
        c.scheduler().wait_ready()
        c.worker("w1").wait_ready()
        out = tmp_path / "out"
        proc = c.submit(str(manifest), "--output", str(out), "--max-size", "32", "--wait")
        assert proc.returncode == 0, proc.stderr + c.procs[0].log()[-2000:]
        job = proc.stdout.split()[0]
        report = [json.loads(x) for x in
                  (out / "_capvst" / job / "report.jsonl").read_text().splitlines()]
        assert [r["status"] for r in report] == ["succeeded"] * 3
        assert all((out / f"c{i}__s.png").is_file() for i in range(3))
        # the job's state is on the master the sentinel named
        assert c.redis.client().hget(f"capvst:job:{job}", "state") == "done"
        st = c.capvst("status", job, "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["succeeded"] == 3, st.stderr
