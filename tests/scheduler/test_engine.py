"""The job engine under faults that used to stall, lose or freeze work: each test drives the
real scheduler functions over a real Redis and real files, and fails on the engine that
committed state before sending the next step, trusted every line, and kept results in Redis.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from capvst.broker import TaskNames
from capvst.results import ItemResult
from scheduler.reconciler import Reconciler
from scheduler.report import merge_in_line_order, write_report
from scheduler.service import drain_inbox, expand_slice
from tests.scheduler.engine import (
    engine,
    finish,
    report_rows,
    run_expansion,
    submit,
    work,
)
from tests.services import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines))
    return path


def _good(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"content": f"c{i}.jpg", "style": "s.png"}) for i in range(start,
                                                                                 start + n)]


def _complete(ctx, out, rec, status="succeeded"):
    run_expansion(ctx, out, rec)
    work(ctx, out, status)
    return finish(ctx, out)


# --- finding 1: a step committed but never sent ------------------------------------------------

def test_a_lost_next_step_is_resent_by_the_reconciler(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path, expand_slice_lines=3)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(10)), tmp_path / "out")
    out.fail = lambda name, kw: name == TaskNames.EXPAND.value  # the publish after the commit
    with pytest.raises(Exception, match="publish refused"):
        expand_slice(ctx, rec.id, 0, 0, 1)
    out.fail = None
    f = ctx.jobs.fields(rec.id)
    assert f["cursor_line"] == "4" and f.get("expanded") != "1"  # committed, nothing queued
    assert expand_slice(ctx, rec.id, 0, 0, 1) == "stale"  # a redelivered old step cannot
    rec_ = Reconciler(ctx)
    assert rec_.tick()
    assert out.take(TaskNames.EXPAND.value) == []  # within its lease: nothing yet
    time.sleep(ctx.settings.lease_seconds + 0.2)
    rec_.tick()
    resent = out.take(TaskNames.EXPAND.value)
    assert resent == [dict(job=rec.id, epoch=0, offset=int(f["cursor_offset"]), line=4)]
    out.sent.append((TaskNames.EXPAND.value, resent[0]))
    run_expansion(ctx, out, rec)
    assert ctx.jobs.fields(rec.id)["expanded"] == "1"
    work(ctx, out)
    assert finish(ctx, out) == ["done"]
    assert [r["line"] for r in report_rows(rec)] == list(range(1, 11))


def test_a_lost_finalize_is_resent_by_the_reconciler(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(3)), tmp_path / "out")
    run_expansion(ctx, out, rec)
    work(ctx, out)
    assert out.take(TaskNames.FINALIZE.value)  # "due" was announced, and then lost
    assert ctx.jobs.fields(rec.id)["state"] == "finalizing"
    time.sleep(ctx.settings.lease_seconds + 0.2)
    Reconciler(ctx).tick()
    assert finish(ctx, out) == ["done"]


def test_a_throttled_expansion_is_picked_up_again(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path, max_queued_tasks=1, throttle_seconds=0.2)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(2)), tmp_path / "out")
    ctx.queue_length = lambda: 5
    assert expand_slice(ctx, rec.id, 0, 0, 1) == "throttled"
    assert out.sent == []  # no self-scheduled message held by a consumer
    ctx.queue_length = lambda: 0
    time.sleep(0.3)
    Reconciler(ctx).tick()
    [step] = out.take(TaskNames.EXPAND.value)
    assert expand_slice(ctx, **step) == "done"


# --- finding 5 and 7: resume of a cancelled job ------------------------------------------------

def test_a_slice_that_read_a_cancel_before_a_resume_records_nothing(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(4)), tmp_path / "out")
    ctx.jobs.request_cancel(rec.id)
    ctx.jobs.uncancel(rec.id, 10)
    epoch = ctx.jobs.reset_for_resume(rec.id)
    # the step queued before the resume carries the old epoch: refused, nothing recorded
    assert expand_slice(ctx, rec.id, epoch - 1, 0, 1) == "stale"
    assert ctx.jobs.counts(rec.id).done == 0  # type: ignore[union-attr]
    assert run_expansion(ctx, out, rec, epoch=epoch) == ["done"]
    assert work(ctx, out) == 4


def test_resume_of_a_big_cancelled_job_never_blocks_redis(redis_server, tmp_path):
    """A million cancelled lines are reopened in steps; no single Redis call runs long."""
    ctx, _out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(1)), tmp_path / "out")
    n = 1_000_000
    r = redis_server.client()
    # the state a cancelled 1M-item job leaves: every line failed and marked cancelled
    r.set(ctx.jobs.key(rec.id, "st"), b"\x55" * (2 * n // 8 + 1))
    r.set(ctx.jobs.key(rec.id, "cx"), b"\xff" * (n // 8 + 1))
    r.hset(ctx.jobs.key(rec.id), mapping={"n_failed": n + 8, "cancelled": "tok"})
    r.config_set("slowlog-log-slower-than", 200_000)
    r.slowlog_reset()
    t0 = time.monotonic()
    reopened = ctx.jobs.uncancel(rec.id, n)
    assert time.monotonic() - t0 < 60
    assert reopened >= n
    assert r.slowlog_get(10) == [], r.slowlog_get(10)


# --- finding 6: a result that changes after the report --------------------------------------

def test_a_late_result_reaches_the_report(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(3)), tmp_path / "out")
    run_expansion(ctx, out, rec)
    chunks = out.take(TaskNames.STYLIZE.value)
    items = [it for k in chunks for it in k["items"]]
    from capvst.manifest import Item

    first = [ItemResult.of_item(Item.model_validate(items[0]), "failed", code="timeout",
                                message="ran past the time limit")]
    first += [ItemResult.of_item(Item.model_validate(i), "succeeded") for i in items[1:]]
    assert ctx.jobs.record(rec.id, first)[1]
    out(TaskNames.FINALIZE.value, {"job": rec.id}, "")
    assert finish(ctx, out) == ["done"]
    assert report_rows(rec)[0]["status"] == "failed"
    # a duplicate copy of the chunk finishes the timed-out item after the report
    late = ItemResult.of_item(Item.model_validate(items[0]), "succeeded", worker="late")
    assert ctx.jobs.record(rec.id, [late]) == (1, True)
    out(TaskNames.FINALIZE.value, {"job": rec.id}, "")
    assert finish(ctx, out) == ["done"]
    rows = report_rows(rec)
    assert rows[0]["status"] == "succeeded" and rows[0]["worker"] == "late"
    assert ctx.jobs.counts(rec.id).succeeded == 3  # type: ignore[union-attr]


# --- finding 8: the manifest is pinned ------------------------------------------------------

def test_a_manifest_overwritten_mid_job_fails_with_manifest_changed(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path, expand_slice_lines=2)
    m = _manifest(tmp_path / "m.jsonl", _good(6))
    rec = submit(ctx, m, tmp_path / "out")
    assert expand_slice(ctx, rec.id, 0, 0, 1) == "next"
    time.sleep(0.01)
    _manifest(m, ["{}"] + _good(8, 100))  # lines would shift under the results
    run_expansion(ctx, out, rec)
    f = ctx.jobs.fields(rec.id)
    assert f["expanded"] == "1" and f["manifest_error"].startswith("manifest_changed:")
    assert f["total"] == "2"  # only the lines read before the change
    work(ctx, out)
    assert finish(ctx, out) == ["done"]
    assert [r["content"].rsplit("/", 1)[1] for r in report_rows(rec)] == ["c0.jpg", "c1.jpg"]


def test_a_versioned_manifest_is_read_at_its_pinned_version(redis_server, tmp_path, s3,
                                                          moto_server):
    from tests.reliability.helpers import versioned_bucket

    bucket = versioned_bucket(s3, f"v-{os.getpid()}-{int(time.time())}")
    body = "".join(x + "\n" for x in _good(4)).encode()
    s3.put_object(Bucket=bucket, Key="m.jsonl", Body=body)
    ctx, out = engine(redis_server.url, tmp_path, expand_slice_lines=2,
                      s3_endpoint_url=moto_server.url)
    from capvst.jobs import JobRecord, ManifestPin
    from capvst.manifest import JobOptions

    uri = f"s3://{bucket}/m.jsonl"
    pin = ctx.storage.pin(uri)
    assert pin is not None and pin["version_id"]
    rec = JobRecord(id="v1", manifest=uri, base=uri, output=f"s3://{bucket}/out",
                    options=JobOptions(), created=1.0, pin=ManifestPin(**pin))
    ctx.jobs.create(rec)
    assert expand_slice(ctx, rec.id, 0, 0, 1) == "next"
    s3.put_object(Bucket=bucket, Key="m.jsonl", Body=b"{}\n" * 10)
    run_expansion(ctx, out, rec)
    f = ctx.jobs.fields(rec.id)
    assert "manifest_error" not in f and f["total"] == "4"


# --- finding 12: one short line must not stop a job -----------------------------------------

def test_poison_lines_fail_alone(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path)
    deep = "[" * 5000 + "]" * 5000
    lines = _good(2) + [deep, '{"content": "a.jpg", "style": "s.png", "max_size": '
                        + "9" * 5000 + "}", '{"content": 1e999}'] + _good(1, 50)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", lines), tmp_path / "out")
    assert run_expansion(ctx, out, rec) == ["done"]
    assert work(ctx, out) == 3
    assert finish(ctx, out) == ["done"]
    rows = report_rows(rec)
    assert [r["status"] for r in rows] == ["succeeded"] * 2 + ["failed"] * 3 + ["succeeded"]
    assert {r["error"]["code"] for r in rows[2:5]} == {"invalid_item"}


@pytest.mark.parametrize("header", ['""', ",,", "bogus,content", "content,content"])
def test_a_csv_with_an_unusable_header_fails_its_lines_not_the_job(redis_server, tmp_path,
                                                                  header):
    ctx, out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.csv", [header, "a.jpg,s.png", "b.jpg,s.png"]),
                 tmp_path / "out")
    assert run_expansion(ctx, out, rec) == ["done"]
    assert finish(ctx, out) == ["done"]
    rows = report_rows(rec)
    assert [r["line"] for r in rows] == [2, 3]
    assert all(r["error"]["code"] == "invalid_item" for r in rows)


# --- finding 13: finalize never crashes or blocks on odd rows --------------------------------

def test_finalize_survives_odd_uris_and_inputs(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path)
    (tmp_path / "fifo.png").parent.mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "fake.dds").write_bytes(b"DDS " + b"\x7c\x00\x00\x00" + os.urandom(200))
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(1)), tmp_path / "out")
    rows = [
        ItemResult(line=1, content="file:///x/\udcff-lone-surrogate.jpg", status="failed",
                   error={"code": "not_found", "message": "gone \udcff"}),  # type: ignore
        ItemResult(line=2, content=f"file://{tmp_path}/fifo.png", status="succeeded",
                   output=f"file://{tmp_path}/fifo.png"),
        ItemResult(line=3, content=f"file://{tmp_path}/fake.dds", status="succeeded",
                   output=f"file://{tmp_path}/fake.dds"),
    ]
    done = threading.Event()

    def go() -> None:
        write_report(ctx.storage, rec, ctx.jobs.fields(rec.id), merge_in_line_order(rows))
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(30), "writing the report blocked"
    report = report_rows(rec)
    assert [r["line"] for r in report] == [1, 2, 3]
    assert "\\udcff" in (Path(rec.output[7:]) / "_capvst" / rec.id / "report.jsonl"
                         ).read_text()


# --- Redis holds what is running, not what is done -----------------------------------------

def test_results_leave_redis_for_object_storage(redis_server, tmp_path):
    ctx, out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(5)), tmp_path / "out")
    run_expansion(ctx, out, rec)
    work(ctx, out)
    assert ctx.jobs.inbox_length(rec.id) == 5
    assert drain_inbox(ctx, rec) == 5 and ctx.jobs.inbox_length(rec.id) == 0
    files = list((tmp_path / "out" / "_capvst" / rec.id / "results").glob("*.jsonl"))
    assert sum(len(f.read_text().splitlines()) for f in files) == 5
    assert finish(ctx, out) == ["done"]
    r = redis_server.client()
    assert r.keys(f"capvst:job:{rec.id}:*") == []


def test_redis_bytes_per_running_item_stay_under_100(redis_server, tmp_path):
    """While a job runs: two status bits, a cancelled bit and an output claim per line."""
    ctx, _out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(1)), tmp_path / "out")
    r = redis_server.client()
    n = 100_000
    before = int(r.info("memory")["used_memory"])
    for start in range(1, n + 1, 5000):
        lines = range(start, start + 5000)
        ctx.jobs.claim_outputs(rec.id, [(f"{rec.output}/c{ln}__s.png", ln) for ln in lines])
        ctx.jobs.record(rec.id, [ItemResult(line=ln, status="succeeded") for ln in lines])
        ctx.jobs.inbox_drop(rec.id, 5000)  # the reconciler drains it every few seconds
    per_item = (int(r.info("memory")["used_memory"]) - before) / n
    print(f"\nRedis bytes per running item: {per_item:.1f}")
    assert per_item < 100, per_item


def test_resume_of_a_finished_cancelled_job_rebuilds_state_not_late_results(redis_server,
                                                                            tmp_path):
    """The results read back from storage become per-line state again; none is mistaken
    for a late result of the finished job (which Redis would keep as a JSON copy each)."""
    from capvst.manifest import Item
    from scheduler.client import Client

    ctx, out = engine(redis_server.url, tmp_path)
    rec = submit(ctx, _manifest(tmp_path / "m.jsonl", _good(6)), tmp_path / "out")
    run_expansion(ctx, out, rec)
    items = [Item.model_validate(i) for k in out.take(TaskNames.STYLIZE.value)
             for i in k["items"]]
    token = ctx.jobs.request_cancel(rec.id)
    done = [ItemResult.of_item(i, "succeeded") for i in items[:4]]
    done += [ItemResult.of_item(i, "failed", code="cancelled", message="cancelled")
             for i in items[4:]]
    assert ctx.jobs.record(rec.id, done, cancel_token=token)[1]
    out(TaskNames.FINALIZE.value, {"job": rec.id}, "")
    assert finish(ctx, out) == ["cancelled"]
    assert ctx.jobs.counts(rec.id).state == "cancelled"  # type: ignore[union-attr]

    client = Client(ctx.settings)
    client._sender = out
    client.resume(rec.id)
    r = redis_server.client()
    assert r.llen(ctx.jobs.key(rec.id, "late")) == 0
    assert ctx.jobs.ranks(rec.id, [it.line for it in items]) == [3, 3, 3, 3, 0, 0]
    c = ctx.jobs.counts(rec.id)
    assert (c.succeeded, c.failed, c.state) == (4, 0, "queued")  # type: ignore[union-attr]
    [step] = out.take(TaskNames.EXPAND.value)
    assert run_expansion(ctx, out, rec, epoch=step["epoch"]) == ["done"]
    assert work(ctx, out) == 2  # only the cancelled lines run again
    assert finish(ctx, out) == ["done"]
    assert [x["status"] for x in report_rows(rec)] == ["succeeded"] * 6
