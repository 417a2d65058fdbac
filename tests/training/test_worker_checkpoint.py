"""A checkpoint from ``capvst train`` goes straight into the fleet: ``capvst.load_model`` takes
it, and a real stylize worker pinned to it by sha256 serves an item and reports its model."""

from __future__ import annotations

import hashlib

import pytest

import capvst
from capvst.settings import Settings
from capvst.training import TrainConfig, train
from tests.reliability.helpers import put_inputs, put_manifest, report, submit, wait_done
from tests.services import Cluster
from tests.training.helpers import image_folders, write_vgg

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tmp_path, one_thread):
    content, style = image_folders(tmp_path / "data", n_content=1, n_style=1)
    cfg = TrainConfig(mode="photorealistic", content=str(content), style=str(style),
                      vgg=str(write_vgg(tmp_path / "vgg.pth")), out=str(tmp_path / "run"),
                      steps=2, fine_tune_steps=0, new_size=32, crop=32, device="cpu", workers=0)
    summary = train(cfg, Settings(), progress="none")
    return tmp_path / "run" / "checkpoint.pt", summary


def test_load_model_and_a_worker_serve_the_trained_checkpoint(trained, tmp_path, moto_server,
                                                              s3, bucket):
    ckpt, summary = trained
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert summary["sha256"] == digest and summary["model_id"] == digest[:12]
    model = capvst.load_model("photorealistic", str(ckpt), expected_sha256=digest)
    assert model.model_id == digest[:12]

    c = Cluster(tmp_path / "cluster", moto_server.url, checkpoint_photorealistic=str(ckpt),
                checkpoint_photorealistic_sha256=digest, worker_modes="photorealistic")
    try:
        put_inputs(s3, bucket, 1, size=64, styles=1)
        manifest = put_manifest(s3, bucket, [{"content": "c0.jpg", "style": "s0.png"}])
        c.scheduler().wait_ready()
        worker = c.worker("w1").wait_ready(timeout=180)
        job = submit(c, manifest, f"s3://{bucket}/out", "--max-size", "64")
        try:
            wait_done(c, job, timeout=240)
        except TimeoutError:
            pytest.fail("the worker did not finish its one item; its log ends:\n"
                        + worker.log()[-3000:])
        rows = report(s3, bucket, "out", job)
        assert [r["status"] for r in rows] == ["succeeded"], rows
        assert rows[0]["model"] == digest[:12]
        assert f"model {digest[:12]}" in worker.log()
    finally:
        c.stop()
