"""The stylize pipeline on real Redis and real files, with the bench's stand-in model (a
fixed pause; the output is the resized content) so no network runs: trust, provenance,
deaths, cancellation, batching of bookkeeping, and handing back under Redis faults."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from capvst.heartbeat import Heartbeat
from capvst.jobs import JobRecord, JobStore, connect
from capvst.manifest import Item, JobOptions
from capvst.metrics import WorkerMetrics
from capvst.settings import Settings
from capvst.storage import META_JOB, META_LINE, Storage, file_uri
from tests.data import image_bytes
from tests.services import RedisServer
from worker.context import WorkerContext
from worker.pipeline import ChunkRunner, HandBack

JOB = "job-p"


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def setup(redis_server, tmp_path):
    s = Settings(broker_url=redis_server.url, local_root=tmp_path, standin_model_seconds=0.0,
                 lease_seconds=3, retry_backoff=0.01, retry_backoff_max=0.05,
                 inflight_items=3, flush_seconds=60, task_max_retries=1)
    jobs = JobStore(connect(redis_server.url, retry_seconds=4), 3600, s.lease_seconds)
    sent: list = []
    ctx = WorkerContext(s, Storage(s), jobs, lambda n, k, r: sent.append((n, k)), {},
                        fetch_pool=ThreadPoolExecutor(2), encode_pool=ThreadPoolExecutor(2))
    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"c{i}.png").write_bytes(image_bytes((40, 32), seed=i))
    (tmp_path / "in" / "s.png").write_bytes(image_bytes((32, 32), seed=9))
    rec = JobRecord(id=JOB, manifest=file_uri(str(tmp_path / "m.jsonl")),
                    base=file_uri(str(tmp_path / "m.jsonl")),
                    output=file_uri(str(tmp_path / "out")), options=JobOptions(), created=1.0)
    jobs.create(rec)
    return ctx, rec, sent, tmp_path


def item(tmp: Path, n: int, **kw) -> Item:
    return Item(line=n + 1, content=file_uri(str(tmp / "in" / f"c{n}.png")),
                styles=[file_uri(str(tmp / "in" / "s.png"))], mode="photorealistic",
                max_size=64, output=kw.pop("output", file_uri(str(tmp / "out" / f"o{n}.png"))),
                format="png", **kw)


def run(ctx, items, task="t1", job=JOB):
    with Heartbeat(ctx.jobs, task, job, [i.line for i in items],
                   items=[i.model_dump() for i in items],
                   deadline=time.time() + 600) as hb:
        runner = ChunkRunner(ctx, job, items, task, "w@test", hb)
        return runner.run()


def test_a_chunk_runs_through_and_records_in_batches(setup, redis_server):
    ctx, rec, _sent, tmp = setup
    r = redis_server.client()
    r.config_resetstat()
    out = run(ctx, [item(tmp, n) for n in range(6)])
    assert (out.succeeded, out.failed, out.processed) == (6, 0, 6)
    assert ctx.jobs.ranks(JOB, list(range(1, 7))) == [3] * 6
    calls = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    assert calls <= 3, calls  # one round trip per batch of results, not one per item
    meta = ctx.storage.metadata(file_uri(str(tmp / "out" / "o2.png")))
    assert meta == {META_JOB: JOB, META_LINE: "3"}


def test_outputs_already_written_by_this_item_count_as_succeeded(setup):
    ctx, _rec, _sent, tmp = setup
    mine = file_uri(str(tmp / "out" / "o0.png"))
    other = file_uri(str(tmp / "out" / "o1.png"))
    ctx.storage.write(mine, b"partial run", metadata={META_JOB: JOB, META_LINE: "1"})
    ctx.storage.write(other, b"earlier job", metadata={META_JOB: "older", META_LINE: "9"})
    out = run(ctx, [item(tmp, 0), item(tmp, 1)])
    assert (out.succeeded, out.skipped) == (1, 1)
    assert (tmp / "out" / "o0.png").read_bytes() == b"partial run"  # never recomputed


def test_a_forged_chunk_for_an_unknown_job_writes_nothing(setup, redis_server):
    ctx, _rec, _sent, tmp = setup
    out = run(ctx, [item(tmp, 0)], job="ghost")
    assert out.note == "unknown job" and out.processed == 0
    assert not (tmp / "out").exists()
    assert redis_server.client().keys("capvst:job:ghost*") == []


def test_forged_outputs_outside_the_prefix_or_in_capvst_folder_fail(setup):
    ctx, _rec, _sent, tmp = setup
    items = [item(tmp, 0, output=file_uri(str(tmp / "out" / "_capvst" / "evil.png"))),
             item(tmp, 1, output=file_uri(str(tmp / "elsewhere" / "x.png"))),
             item(tmp, 2, output=f"file://{tmp}/out/../escaped/x.png")]
    out = run(ctx, items)
    assert out.failed == 3 and out.succeeded == 0
    assert not (tmp / "out" / "_capvst" / "evil.png").exists()
    assert not (tmp / "elsewhere").exists() and not (tmp / "escaped").exists()


def test_a_dead_earlier_run_charges_its_lines_and_isolates_them(setup):
    ctx, _rec, _sent, tmp = setup
    items = [item(tmp, n) for n in range(3)]
    ctx.jobs.lease_take("t1", "dead-run", JOB, [1, 2, 3])
    ctx.jobs.mark_dead("t1")  # what the worker's parent notes when a pool process dies
    ctx.settings.max_deliveries = 1
    out = run(ctx, items)
    assert out.failed == 3
    assert {c for c in out.codes} == {"model_error"}


def test_the_earlier_run_that_passed_the_hard_limit_times_its_items_out(setup):
    ctx, _rec, _sent, tmp = setup
    items = [item(tmp, n) for n in range(3)]
    ctx.jobs.lease_take("t1", "slow-run", JOB, [2], deadline=time.time() - 1)
    ctx.jobs.mark_dead("t1")
    out = run(ctx, items)
    assert out.codes == {"timeout": 1} and out.succeeded == 2


def test_a_cancelled_job_fails_its_queued_items(setup):
    ctx, _rec, _sent, tmp = setup
    ctx.jobs.request_cancel(JOB)
    out = run(ctx, [item(tmp, n) for n in range(4)])
    assert out.codes == {"cancelled": 4}
    assert not (tmp / "out").exists()


def test_bookkeeping_refused_by_redis_hands_the_chunk_back(setup, redis_server):
    ctx, _rec, _sent, tmp = setup
    r = redis_server.client()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # every write is refused: out of memory
    try:
        ctx.jobs.lease_seconds = 3
        hb = Heartbeat(ctx.jobs, "t9", JOB, [1])
        hb.previous = None
        runner = ChunkRunner(ctx, JOB, [item(tmp, 0)], "t9", "w", hb,
                             soft_deadline=time.monotonic() + 2)
        with pytest.raises(HandBack, match="OutOfMemory|OOM"):
            runner.run()
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            hb.__enter__()  # the task turns this into a hand-back too
    finally:
        r.config_set("maxmemory", 0)
    assert ctx.jobs.ranks(JOB, [1]) == [0]  # nothing recorded, nothing lost: handed back


def test_chunk_outcome_is_json(setup):
    ctx, _rec, _sent, tmp = setup
    out = run(ctx, [item(tmp, 0)])
    assert json.loads(json.dumps(out.as_dict()))["succeeded"] == 1


class RecordingMetrics(WorkerMetrics):
    """What the pipeline reports to the metrics, kept in lists."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.items: list[tuple[str | None, str, str | None]] = []
        self.stage_sets: list[dict[str, float]] = []

    def item(self, mode, status, code):
        self.items.append((mode, status, code))

    def stages(self, seconds):
        self.stage_sets.append(dict(seconds))


def test_a_chunk_with_a_failed_item_says_so_and_reports_its_stages(setup):
    ctx, _rec, _sent, tmp = setup
    ctx.metrics = RecordingMetrics()
    missing = item(tmp, 1).model_copy(update={"content": file_uri(str(tmp / "in" /
                                                                      "nope.png"))})
    out = run(ctx, [item(tmp, 0), missing]).as_dict()
    assert list(out)[0] == "outcome"  # what Flower's result column shows first
    assert out["outcome"] == "ITEM_FAILURES" and out["failed"] == 1
    assert out["succeeded"] == 1 and out["codes"] == {"not_found": 1}
    assert sorted(ctx.metrics.items) == [("photorealistic", "failed", "not_found"),
                                         ("photorealistic", "succeeded", None)]
    by_keys = sorted(sorted(s) for s in ctx.metrics.stage_sets)
    assert by_keys == [["decode", "encode", "fetch", "model", "upload"], ["fetch"]]
    assert all(v >= 0 for s in ctx.metrics.stage_sets for v in s.values())
    assert run(ctx, [item(tmp, 2)], task="t2").as_dict()["outcome"] == "OK"


class _BatchingModel:
    """A stand-in Stylizer: records batches; a batch holding the poison pixel fails, and so
    does that item alone (the others then succeed one by one)."""

    def __init__(self, device: str = "cpu") -> None:
        import torch

        self.batches: list[int] = []
        self.singles = 0
        self.device = torch.device(device)

    def has_style(self, *a) -> bool:
        return False

    def tile_side(self, *a):
        return None  # every content fits whole

    @staticmethod
    def _poison(img) -> bool:
        return img.getpixel((0, 0)) == (1, 2, 3)

    def stylize_batch(self, contents, styles, **kw):
        import numpy as np

        from capvst.errors import ModelError

        self.batches.append(len(contents))
        if any(self._poison(c) for c in contents):
            raise RuntimeError("boom in a batch")
        if any(c.size != contents[0].size for c in contents):
            raise ModelError("mixed sizes in one batch")
        return [np.asarray(c) for c in contents]

    def stylize(self, content, styles, **kw):
        import numpy as np

        from capvst.errors import ModelError

        self.singles += 1
        if self._poison(content):
            raise ModelError("the poison item")
        return np.asarray(content)


def test_batches_form_and_a_failing_batch_runs_one_by_one(setup):
    from PIL import Image

    ctx, _rec, _sent, tmp = setup
    ctx.settings = ctx.settings.model_copy(update={"standin_model_seconds": None,
                                                   "batch_size": 3, "inflight_items": 8})
    model = _BatchingModel()
    ctx.stylizers["photorealistic"] = model  # type: ignore[assignment]
    img = Image.open(tmp / "in" / "c4.png").convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(tmp / "in" / "c4.png")
    (tmp / "in" / "c5.png").write_bytes(image_bytes((64, 32), seed=5))  # another size
    out = run(ctx, [item(tmp, n) for n in range(6)])
    # c0..c2 one batch; c3, c4 a batch that fails and reruns singly; c5 alone (its size)
    assert model.batches == [3, 2]
    assert model.singles == 3
    assert (out.succeeded, out.failed, out.batched) == (5, 1, 3)
    assert out.codes == {"model_error": 1}
    assert ctx.jobs.ranks(JOB, list(range(1, 7))) == [3, 3, 3, 3, 1, 3]


def test_encoder_settings_reach_the_outputs(setup):
    """An item's png_level and jpeg_quality are the encoder's: the same PNG pixels in a
    different file, a smaller JPEG."""
    import numpy as np
    from PIL import Image

    ctx, _rec, _sent, tmp = setup
    (tmp / "in" / "c0.png").write_bytes(image_bytes((256, 192), seed=3))
    outs = {name: tmp / "out" / name for name in ("p0.png", "p9.png", "j20.jpg", "j95.jpg")}
    items = [item(tmp, 0, output=file_uri(str(outs["p0.png"])), png_level=0),
             item(tmp, 0, output=file_uri(str(outs["p9.png"])), png_level=9),
             item(tmp, 0, output=file_uri(str(outs["j20.jpg"])), jpeg_quality=20),
             item(tmp, 0, output=file_uri(str(outs["j95.jpg"])))]
    for n, it in enumerate(items):
        it.line = n + 1
        if it.output.endswith(".jpg"):
            it.format = "jpg"
    out = run(ctx, items)
    assert out.succeeded == 4
    p0, p9 = (np.asarray(Image.open(outs[k])) for k in ("p0.png", "p9.png"))
    assert np.array_equal(p0, p9)
    assert outs["p0.png"].stat().st_size > outs["p9.png"].stat().st_size
    assert outs["j20.jpg"].stat().st_size < outs["j95.jpg"].stat().st_size


@pytest.mark.parametrize("device, batches", [("cpu", []), ("cuda", [4, 2])])
def test_unset_batch_size_batches_on_a_gpu_only(setup, device, batches):
    """CAPVST_BATCH_SIZE unset: one image per pass on a CPU (batches are slower there), four
    on a GPU."""
    ctx, _rec, _sent, tmp = setup
    ctx.settings = ctx.settings.model_copy(update={"standin_model_seconds": None,
                                                   "batch_size": None, "inflight_items": 8})
    model = _BatchingModel(device)
    ctx.stylizers["photorealistic"] = model  # type: ignore[assignment]
    out = run(ctx, [item(tmp, n) for n in range(6)])
    assert out.succeeded == 6
    assert model.batches == batches
    assert model.singles == 6 - sum(batches)
