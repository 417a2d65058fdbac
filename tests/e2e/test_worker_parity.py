"""Every reference case through a real queued worker (Redis, moto's S3 server, the scheduler,
checkpoint files), with batching on and off: each output within the parity tolerance of the
original code's (<= 1 level, >= 99.9 % of values identical).

Each case is submitted twice (two outputs), so that with ``CAPVST_BATCH_SIZE=4`` the two
copies meet in one chunk and go through the network together.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import reference_cases
from tests.reliability.helpers import put_manifest, report, submit
from tests.reliability.helpers import wait_done as wait_job
from tests.services import Cluster

pytestmark = pytest.mark.slow
COPIES = 2


def _lines(bucket: str) -> list[dict]:
    lines = []
    for case in reference_cases():
        for k in range(COPIES):
            line = {"content": f"s3://{bucket}/ref/images/{case['content']}",
                    "style": [f"s3://{bucket}/ref/images/{s}" for s in case["style"]],
                    "mode": case["mode"], "max_size": case["max_size"],
                    "output": f"s3://{bucket}/out/{case['name']}-{k}.png", "id": case["name"]}
            for key in ("style_weights", "alpha_c"):
                if key in case:
                    line[key] = case[key]
            for key in ("content_mask", "style_mask"):
                if key in case:
                    line[key] = f"s3://{bucket}/ref/{case[key]}"
            lines.append(line)
    return lines


@pytest.mark.parametrize("batch_size", [4, 1])
def test_reference_cases_through_a_worker(batch_size, reference, tmp_path, moto_server, s3,
                                          bucket):
    # the reference tree links its folders: walk through the links
    for root, _dirs, files in os.walk(reference, followlinks=True):
        for name in files:
            path = Path(root) / name
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                s3.put_object(Bucket=bucket, Key=f"ref/{path.relative_to(reference)}",
                              Body=path.read_bytes())
    manifest = put_manifest(s3, bucket, _lines(bucket))
    c = Cluster(tmp_path, moto_server.url, batch_size=str(batch_size))
    try:
        c.scheduler().wait_ready()
        w = c.worker("w1").wait_ready()
        job = submit(c, manifest, f"s3://{bucket}/out")
        st = wait_job(c, job, timeout=1500)
        assert st["state"] == "done", st
        rows = report(s3, bucket, "out", job)
        assert [r["status"] for r in rows] == ["succeeded"] * len(rows), rows
        by_name = {c["name"]: c for c in reference_cases()}
        for row in rows:
            case = by_name[row["id"]]
            body = s3.get_object(Bucket=bucket, Key=row["output"].split("/", 3)[3])["Body"]
            got = np.asarray(Image.open(io.BytesIO(body.read())).convert("RGB"), np.int16)
            want = np.asarray(Image.open(reference / case["expected_png"]).convert("RGB"),
                              np.int16)
            assert got.shape == want.shape, row["id"]
            diff = np.abs(got - want)
            assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, \
                (row["id"], int(diff.max()), float((diff == 0).mean()))
        batched = sum(int(n) for n in re.findall(r"'batched': (\d+)", w.log()))
        if batch_size == 1:
            assert batched == 0
        else:  # the unmasked cases' copies went through the network in pairs
            unmasked = sum(1 for c in reference_cases() if "content_mask" not in c)
            assert batched == COPIES * unmasked, w.log()[-3000:]
    finally:
        c.stop()
