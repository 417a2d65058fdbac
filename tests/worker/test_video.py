"""The video steps of a worker (plan, segment, join) on real Redis and real files, driven in
this process with the messages they publish caught: redelivery, a failing segment retried
alone, a dead run counted against its segment, broken inputs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from capvst import load_model
from capvst.errors import StorageError
from capvst.heartbeat import Heartbeat
from capvst.jobs import JobRecord, JobStore, connect
from capvst.manifest import Item, JobOptions
from capvst.results import ItemResult
from capvst.settings import Settings
from capvst.storage import Storage, file_uri
from tests.data import image_bytes
from tests.scheduler.engine import Outbox
from tests.services import RedisServer
from tests.video_data import make_video
from worker import video as wv
from worker.context import WorkerContext

JOB = "job-v"
_MODEL: list = []


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def setup(redis_server, tmp_path):
    """A worker context with the seeded untrained network, a job, and a 1 s clip with a
    keyframe every 4 frames cut into 3 segments."""
    s = Settings(broker_url=redis_server.url, local_root=tmp_path, lease_seconds=3,
                 retry_backoff=0.01, retry_backoff_max=0.02, task_max_retries=1,
                 max_deliveries=2, video_segment_seconds=0.34)
    if not _MODEL:
        _MODEL.append(load_model("photorealistic", warn=False))
    jobs = JobStore(connect(redis_server.url, retry_seconds=4), 3600, s.lease_seconds)
    out = Outbox()
    ctx = WorkerContext(s, Storage(s), jobs, out, {"photorealistic": _MODEL[0]},
                        fetch_pool=ThreadPoolExecutor(1), encode_pool=ThreadPoolExecutor(1))
    (tmp_path / "in").mkdir()
    make_video(tmp_path / "in" / "clip.mp4", seconds=1.0, keyint=4)
    (tmp_path / "in" / "s.png").write_bytes(image_bytes((40, 32), seed=9))
    rec = JobRecord(id=JOB, manifest=file_uri(str(tmp_path / "m.jsonl")),
                    base=file_uri(str(tmp_path / "m.jsonl")),
                    output=file_uri(str(tmp_path / "out")), options=JobOptions(), created=1.0)
    jobs.create(rec)
    jobs.r.hset(jobs.key(JOB), mapping={"expanded": 1, "total": 1, "state": "running"})
    wv._PLANS.clear()
    return ctx, out, tmp_path


def video_item(tmp, content="clip.mp4", **kw) -> Item:
    return Item(line=1, content=file_uri(str(tmp / "in" / content)),
                styles=[file_uri(str(tmp / "in" / "s.png"))], mode="photorealistic",
                max_size=64, output=file_uri(str(tmp / "out" / "clip.mp4")), format="mp4",
                video=True, **kw)


def step(ctx, task="t") -> wv.VideoStep:
    return wv.VideoStep(ctx, JOB, 1, task, "w@test")


def segment(ctx, index, task=None):
    task = task or f"seg-{index}"
    with Heartbeat(ctx.jobs, task, JOB, [1]) as hb:
        return wv.run_segment(step(ctx, task), index, hb)


def result(ctx, tmp) -> ItemResult | None:
    """The item's recorded result (None while it has none)."""
    if ctx.jobs.ranks(JOB, [1])[0] == 0:
        return None
    raw = ctx.jobs.inbox_peek(JOB, 10)
    assert len(raw) == 1, raw
    return ItemResult.from_json(raw[0])


@pytest.mark.slow
def test_plan_segments_join_and_every_redelivery_is_harmless(setup):
    ctx, out, tmp = setup
    item = video_item(tmp)
    assert wv.plan_item(step(ctx), item) == "planned"
    segs = out.take("capvst.video.segment")
    assert [m["index"] for m in segs] == [0, 1, 2]
    assert wv.plan_item(step(ctx), item) == "planned"  # a second plan reads the first
    assert [m["index"] for m in out.take("capvst.video.segment")] == [0, 1, 2]
    for m in reversed(segs):  # any order, any worker
        assert segment(ctx, m["index"]) == "done"
    assert out.take("capvst.video.join") == [{"job": JOB, "line": 1}]
    assert segment(ctx, 1) == "done already"  # a late copy only makes sure join is sent
    assert len(out.take("capvst.video.join")) == 1
    assert wv.join_item(step(ctx)) == "succeeded"
    r = result(ctx, tmp)
    assert r is not None and r.status == "succeeded"
    assert (r.frames, r.segments, r.attempts) == (12, 3, 1)
    assert r.warping_error is not None and r.warping_error > 0
    assert (tmp / "out" / "clip.mp4").exists()
    folder = tmp / "out" / "_capvst" / JOB / "video" / "1"
    assert not list(folder.glob("seg-*.mp4"))  # media dropped, results kept
    assert len(list(folder.glob("seg-*.mp4.json"))) == 3
    assert json.loads((folder / "result.json").read_text())["frames"] == 12
    assert ctx.jobs.r.keys("capvst:job:job-v:video:*") == []
    # redelivered copies of every step after the item was recorded do nothing
    assert wv.join_item(step(ctx)) == "final"
    assert segment(ctx, 0) == "final"
    assert wv.plan_item(step(ctx), item) == "final"
    assert out.sent == [] or all(n == "capvst.finalize" for n, _ in out.sent)


def test_a_failing_segment_is_retried_alone_then_fails_the_item(setup, monkeypatch):
    ctx, out, tmp = setup
    wv.plan_item(step(ctx), video_item(tmp))
    out.take("capvst.video.segment")
    calls = []

    def flaky(step_, plan, index, uri):
        calls.append(index)
        raise StorageError("S3 said 503")

    monkeypatch.setattr(wv, "_stylize_segment", flaky)
    assert segment(ctx, 1) == "retried"
    assert [m["index"] for m in out.take("capvst.video.segment")] == [1]  # that one alone
    assert ctx.jobs.ranks(JOB, [1]) == [0]
    assert segment(ctx, 1) == "failed"  # CAPVST_TASK_MAX_RETRIES=1: the second failure ends it
    r = result(ctx, tmp)
    assert r is not None and r.status == "failed" and r.code == "storage_error"
    assert "segment 1 failed 2 times" in r.error.message
    assert r.attempts == 3
    assert calls == [1, 1]
    assert out.take("capvst.video.segment") == []


def test_bad_input_in_a_segment_fails_the_item_at_once(setup, monkeypatch):
    from capvst.errors import BadVideo

    ctx, out, tmp = setup
    wv.plan_item(step(ctx), video_item(tmp))

    def broken(*_a):
        raise BadVideo("clip.mp4 is truncated: 2 of 4 frames from frame 4 could be decoded")

    monkeypatch.setattr(wv, "_stylize_segment", broken)
    assert segment(ctx, 1) == "bad_video"
    r = result(ctx, tmp)
    assert r is not None and r.code == "bad_video"


def test_a_dead_run_is_counted_against_its_segment_and_bounded(setup, monkeypatch):
    ctx, out, tmp = setup
    wv.plan_item(step(ctx), video_item(tmp))
    ran = []
    monkeypatch.setattr(wv, "_stylize_segment", lambda s, p, i, u: ran.append(i))
    # the first run of the message died (its pool process was killed): the next one counts it
    ctx.jobs.lease_take("seg-2", "dead-run", JOB, [1])
    ctx.jobs.mark_dead("seg-2")
    assert segment(ctx, 2) == "done" and ran == [2]
    assert ctx.jobs.r.hget(wv.tries_key(JOB, 1), "2") == "1"
    # a node lost without a word (the lease is simply no longer alive), for the second time
    ctx.jobs.r.hset(wv.tries_key(JOB, 1), "0", 1)
    ctx.jobs.lease_take("seg-0", "lost-node", JOB, [1])
    ctx.jobs.r.delete("capvst:alive:seg-0:lost-node")
    assert segment(ctx, 0) == "failed"  # CAPVST_MAX_DELIVERIES=2 deaths of segment 0
    assert ran == [2]
    r = result(ctx, tmp)
    assert r is not None and r.code == "model_error" and "died" in r.error.message


def test_a_live_copy_of_the_same_message_is_not_a_death(setup, monkeypatch):
    ctx, out, tmp = setup
    wv.plan_item(step(ctx), video_item(tmp))
    monkeypatch.setattr(wv, "_stylize_segment", lambda *a: None)
    ctx.jobs.lease_take("seg-1", "still-running", JOB, [1])  # alive for lease_seconds
    assert segment(ctx, 1) == "done"
    assert ctx.jobs.r.hget(wv.tries_key(JOB, 1), "1") is None


@pytest.mark.parametrize("name,body,code", [
    ("broken.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 3000, "bad_video"),
    ("empty.mp4", b"", "bad_video"),
    ("missing.mp4", None, "not_found"),
])
def test_plan_fails_broken_videos_with_their_code(setup, name, body, code):
    ctx, out, tmp = setup
    if body is not None:
        (tmp / "in" / name).write_bytes(body)
    assert wv.plan_item(step(ctx), video_item(tmp, name)) == code
    r = result(ctx, tmp)
    assert r is not None and r.code == code
    assert out.take("capvst.video.segment") == []


def test_plan_refuses_videos_over_the_frame_limit(setup):
    ctx, out, tmp = setup
    ctx.settings.max_video_frames = 10
    assert wv.plan_item(step(ctx), video_item(tmp)) == "too_large"
    assert "CAPVST_MAX_VIDEO_FRAMES" in result(ctx, tmp).error.message


def test_a_cancelled_job_fails_its_video_item(setup):
    ctx, out, tmp = setup
    ctx.jobs.request_cancel(JOB)
    assert wv.plan_item(step(ctx), video_item(tmp)) == "cancelled"
    assert result(ctx, tmp).code == "cancelled"


def test_video_messages_pass_the_guard():
    from capvst.broker import message_problem

    item = Item(line=3, content="s3://b/v.mp4", styles=["s3://b/s.png"], mode="artistic",
                max_size=64, output="s3://b/out/v.mp4", format="mp4", video=True)
    body = [[], {"job": "j", "item": item.model_dump()}, {}]
    assert message_problem("capvst.video.plan", {"id": "x"}, body) is None
    assert message_problem("capvst.video.segment", {"id": "x"},
                           [[], {"job": "j", "line": 3, "index": 0}, {}]) is None
    assert message_problem("capvst.video.segment", {"id": "x"},
                           [[], {"job": "j", "line": 0, "index": -1}, {}]) is not None
    assert message_problem("capvst.video.join", {"id": "x"},
                           [[], {"job": "j", "line": 3}, {}]) is None


def test_a_segment_whose_result_is_stored_is_not_run_again(setup, monkeypatch):
    ctx, out, tmp = setup
    wv.plan_item(step(ctx), video_item(tmp))
    out.take("capvst.video.segment")
    ran = []
    monkeypatch.setattr(wv, "_stylize_segment", lambda s, p, i, u: ran.append(i))
    folder = tmp / "out" / "_capvst" / JOB / "video" / "1"
    (folder / "seg-0001.mp4.json").write_text("{}")  # Redis lost the done set, storage has it
    assert segment(ctx, 1) == "done already"
    assert ran == [] and ctx.jobs.r.smembers(wv.done_key(JOB, 1)) == {"1"}
