"""What a worker trusts: JSON only from the broker, checkpoints it can verify."""

from __future__ import annotations

import json
import os
import pickle
import uuid

import pytest
from kombu import Connection

from capvst.model import save_checkpoint, untrained
from tests.services import Cluster, wait_for

pytestmark = pytest.mark.slow


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_message_is_refused_never_executed(tmp_path):
    c = Cluster(tmp_path, None)
    marker = tmp_path / "executed"
    try:
        w = c.worker("w1").wait_ready()
        task_id = str(uuid.uuid4())
        body = pickle.dumps(((), {"job": "x", "items": _Payload(str(marker))}, {}))
        with Connection(c.redis.url) as conn:
            producer = conn.Producer()
            producer.publish(body, routing_key="capvst.stylize", exchange="capvst.stylize",
                             content_type="application/x-python-serialize",
                             content_encoding="binary",
                             headers={"task": "capvst.stylize", "id": task_id, "lang": "py",
                                      "argsrepr": "()", "kwargsrepr": "{}"})
        wait_for(lambda: "Refusing to deserialize" in w.log(), 30,
                 "the worker to refuse the pickled message")
        assert not marker.exists()
        assert w.proc.poll() is None
    finally:
        c.stop()


def test_worker_refuses_to_start_with_a_bad_checkpoint(tmp_path):
    ckpt = tmp_path / "photo.pt"
    save_checkpoint(untrained("photorealistic").net, "photorealistic", ckpt)
    c = Cluster(tmp_path, None, worker_modes="photorealistic",
                checkpoint_photorealistic=str(ckpt),
                checkpoint_photorealistic_sha256="0" * 64)
    try:
        w = c.worker("pinned")
        wait_for(lambda: w.proc.poll() is not None, 60, "the worker to give up")
        assert w.proc.returncode != 0
        assert "cannot start" in w.log() and "sha256" in w.log()
        (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
        c.env["CAPVST_CHECKPOINT_PHOTOREALISTIC"] = str(tmp_path / "junk.pt")
        c.env.pop("CAPVST_CHECKPOINT_PHOTOREALISTIC_SHA256")
        w2 = c.worker("junk")
        wait_for(lambda: w2.proc.poll() is not None, 60, "the worker to give up")
        assert "not a PyTorch checkpoint" in w2.log()
        # the right pin starts normally and reports the checkpoint's id
        import hashlib

        c.env["CAPVST_CHECKPOINT_PHOTOREALISTIC"] = str(ckpt)
        c.env["CAPVST_CHECKPOINT_PHOTOREALISTIC_SHA256"] = hashlib.sha256(
            ckpt.read_bytes()).hexdigest()
        ok = c.worker("good").wait_ready()
        model_id = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]
        # the pool process names the model it loaded once it is ready to take tasks
        wait_for(lambda: f"model {model_id} ready" in ok.log(), 60, "the model to load")
        assert ok.proc.poll() is None
    finally:
        c.stop()


def test_only_json_is_accepted():
    from capvst.broker import create_app
    from capvst.settings import Settings

    conf = create_app(Settings()).conf
    assert list(conf.accept_content) == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert json.dumps(list(conf.accept_content))


def test_worker_that_cannot_use_its_device_stops(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal needs a machine without it")
    c = Cluster(tmp_path, None, device="cuda")
    try:
        w = c.worker("nogpu")
        wait_for(lambda: w.proc.poll() is not None, 90, "the worker to stop")
        assert w.proc.returncode != 0
        assert "cannot start" in w.log() and "CUDA is not available" in w.log()
    finally:
        c.stop()


def test_each_queue_has_its_own_exchange():
    """A queue bound to another queue's exchange would receive that queue's messages too."""
    from capvst.broker import Queues, create_app
    from capvst.settings import Settings

    conf = create_app(Settings()).conf
    for q in conf.task_queues:
        assert q.exchange.name == q.name and q.routing_key == q.name
    assert {q.name for q in conf.task_queues} == {q.value for q in Queues}
    assert conf.task_routes["capvst.expand"] == {"queue": "capvst.schedule"}
