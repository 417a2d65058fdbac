"""Job state in a real redis-server: idempotent records, the expansion cursor, finalize, resume."""

from __future__ import annotations

import threading
import time

import pytest

from capvst.jobs import JOBS_INDEX, JobRecord, JobStore, connect
from capvst.manifest import JobOptions
from tests.services import RedisServer

JOB = "j-0001"


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server) -> JobStore:
    return JobStore(connect(redis_server.url, retry_seconds=10), ttl_seconds=3600)


def make_record(job: str = JOB, created: float = 1_700_000_000.5) -> JobRecord:
    return JobRecord(id=job, manifest="s3://in/m/manifest.jsonl", base="s3://in/m/manifest.jsonl",
                     output="s3://out/run", options=JobOptions(mode="artistic", max_size=512),
                     format="jsonl", created=created)


@pytest.fixture
def job(store) -> str:
    store.create(make_record())
    return JOB


def result(line: int, status: str = "succeeded", code: str | None = None, **kw) -> dict:
    return {"line": line, "id": None, "content": f"s3://in/c{line}.jpg", "style": "s3://in/s.jpg",
            "output": f"s3://out/run/c{line}__s.png", "status": status,
            "error": {"code": code, "message": code} if code else None, "attempts": 1,
            "seconds": 0.5, "worker": "w1", "model": "untrained", **kw}


def done_counts(store: JobStore, job: str = JOB) -> tuple[int, int, int]:
    c = store.counts(job)
    assert c is not None
    return c.succeeded, c.skipped, c.failed


def expand_all(store: JobStore, job: str, items: int, valid: int | None = None,
               epoch: int = 0) -> int:
    """One slice from offset 0 to EOF; returns advance's answer."""
    return store.advance(job, epoch, 0, 1000, items + 1, True, items,
                         items if valid is None else valid)


# --- the job -----------------------------------------------------------------------------------

def test_create_and_read_back(store, redis_server):
    rec = make_record()
    assert not store.exists(JOB) and store.record_of(JOB) is None and store.counts(JOB) is None
    store.create(rec)
    assert store.exists(JOB)
    assert store.record_of(JOB) == rec
    assert store.record_of(JOB).options.mode == "artistic"  # type: ignore[union-attr]
    c = store.counts(JOB)
    assert c is not None
    assert (c.state, c.total, c.valid, c.expanded_items, c.done) == ("queued", None, None, 0, 0)
    assert (c.cancelled, c.created, c.started, c.finished) == (False, rec.created, None, None)
    assert redis_server.client().zscore(JOBS_INDEX, JOB) == rec.created


def test_fields_and_set(store, job):
    store.set(job, state="running", started=12.5, errors={"bad_image": 2})
    f = store.fields(job)
    assert f["state"] == "running" and f["errors"] == '{"bad_image": 2}'
    c = store.counts(job)
    assert c is not None and c.state == "running" and c.started == 12.5
    assert store.set_if_absent(job, "finalizer", "w1") is True
    assert store.set_if_absent(job, "finalizer", "w2") is False
    assert store.fields(job)["finalizer"] == "w1"


# --- record ------------------------------------------------------------------------------------

def test_record_counts_each_line_once(store, job):
    assert store.record(job, result(1)) == (1, False)
    assert store.record(job, result(1)) == (0, False)
    assert store.record(job, result(2, "failed", "bad_image")) == (1, False)
    assert store.record(job, result(2, "failed", "bad_image")) == (0, False)
    assert store.record(job, result(3, "skipped")) == (1, False)
    assert done_counts(store) == (1, 1, 1)
    assert store.counts(job).done == 3  # type: ignore[union-attr]
    assert store.result(job, 2)["error"]["code"] == "bad_image"  # type: ignore[index]
    assert store.result(job, 99) is None


@pytest.mark.parametrize("worse,better", [
    ("failed", "skipped"), ("failed", "succeeded"), ("skipped", "succeeded")])
def test_a_better_result_replaces_a_worse_one(store, job, worse, better):
    store.record(job, result(1, worse, "timeout" if worse == "failed" else None))
    before = store.counts(job).done  # type: ignore[union-attr]
    assert store.record(job, result(1, better, worker="w2")) == (2, False)
    assert store.result(job, 1)["status"] == better  # type: ignore[index]
    assert store.result(job, 1)["worker"] == "w2"  # type: ignore[index]
    assert store.counts(job).done == before == 1  # type: ignore[union-attr]
    expected = {"succeeded": 0, "skipped": 0, "failed": 0, better: 1}
    assert done_counts(store) == (expected["succeeded"], expected["skipped"], expected["failed"])


@pytest.mark.parametrize("better,worse", [
    ("succeeded", "skipped"), ("succeeded", "failed"), ("skipped", "failed")])
def test_a_worse_result_never_replaces_a_better_one(store, job, better, worse):
    store.record(job, result(1, better, worker="first"))
    assert store.record(job, result(1, worse, "model_error" if worse == "failed" else None,
                                    worker="second")) == (0, False)
    assert store.result(job, 1)["status"] == better  # type: ignore[index]
    assert store.result(job, 1)["worker"] == "first"  # type: ignore[index]
    assert store.counts(job).done == 1  # type: ignore[union-attr]


def test_record_of_an_unknown_job_is_refused(store):
    assert store.record("ghost", result(1)) == (-1, False)
    assert store.result("ghost", 1) is None


def test_record_rejects_a_bad_status(store, job):
    with pytest.raises(ValueError, match="bad status 'done'"):
        store.record(job, result(1, "done"))
    assert store.counts(job).done == 0  # type: ignore[union-attr]


def test_concurrent_duplicate_records_count_once(store, job):
    barrier = threading.Barrier(8)
    answers: list = []

    def go(n: int) -> None:
        barrier.wait()
        for line in range(1, 51):
            answers.append(store.record(job, result(line, worker=f"w{n}"))[0])

    threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers.count(1) == 50 and answers.count(0) == 350
    assert done_counts(store) == (50, 0, 0)


# --- expansion cursor and finalize -------------------------------------------------------------

def test_advance_is_a_compare_and_set_on_epoch_and_offset(store, job):
    assert store.advance(job, 0, 0, 500, 11, False, 10, 9) == 0
    # the same slice again (a redelivered expand task) and a stale epoch are refused
    assert store.advance(job, 0, 0, 500, 11, False, 10, 9) == -1
    assert store.advance(job, 1, 500, 900, 21, False, 10, 10) == -1
    assert store.advance(job, 0, 499, 900, 21, False, 10, 10) == -1
    f = store.fields(job)
    assert (f["cursor_offset"], f["cursor_line"]) == ("500", "11")
    assert store.counts(job).expanded_items == 10  # type: ignore[union-attr]
    assert store.advance(job, 0, 500, 900, 21, False, 10, 10) == 0
    assert store.advance(job, 0, 900, 950, 24, True, 3, 1) == 0
    c = store.counts(job)
    assert c is not None
    assert (c.total, c.valid, c.expanded_items) == (23, 20, 23)
    assert store.fields(job)["max_line"] == "23"


def test_advance_of_an_unknown_job_is_stale(store):
    assert store.advance("ghost", 0, 0, 10, 2, True, 1, 1) == -1
    assert store.counts("ghost") is None


def test_finalize_due_on_the_record_that_completes_the_job(store, job):
    assert expand_all(store, job, 3) == 0  # nothing recorded yet
    assert store.record(job, result(1)) == (1, False)
    assert store.record(job, result(2, "failed", "bad_image")) == (1, False)
    assert store.record(job, result(3, "skipped")) == (1, True)
    # duplicates and upgrades after that never make it due again
    assert store.record(job, result(3, "skipped")) == (0, False)
    assert store.record(job, result(2)) == (2, False)
    assert store.record(job, result(3)) == (2, False)
    assert done_counts(store) == (3, 0, 0)


def test_no_finalize_before_expansion_reaches_eof(store, job):
    assert store.advance(job, 0, 0, 100, 3, False, 2, 2) == 0
    assert store.record(job, result(1)) == (1, False)
    assert store.record(job, result(2)) == (1, False)  # every known item done, but not EOF
    assert store.advance(job, 0, 100, 200, 5, False, 2, 2) == 0
    assert store.record(job, result(3)) == (1, False)
    assert store.record(job, result(4)) == (1, False)
    assert store.advance(job, 0, 200, 200, 5, True, 0, 0) == 1  # EOF with all recorded
    # an empty last slice leaves the cursor where it was, so its redelivery passes the
    # compare-and-set; it must still not make finalize due twice nor change the totals
    assert store.advance(job, 0, 200, 200, 5, True, 0, 0) != 1
    c = store.counts(job)
    assert c is not None and (c.total, c.valid, c.done) == (4, 4, 4)


def test_finalize_due_on_advance_when_everything_was_recorded(store, job):
    for line in (1, 2, 3):
        assert store.record(job, result(line)) == (1, False)
    assert expand_all(store, job, 3) == 1
    assert store.record(job, result(1)) == (0, False)
    assert store.fields(job)["finalize_queued"] == "1"


def test_empty_manifest_is_due_at_eof(store, job):
    assert store.advance(job, 0, 0, 0, 1, True, 0, 0) == 1
    c = store.counts(job)
    assert c is not None and c.total == 0 and c.valid == 0


def test_finalize_due_exactly_once_under_concurrency(store, job):
    expand_all(store, job, 40)
    barrier = threading.Barrier(8)
    dues: list[bool] = []

    def go(n: int) -> None:
        barrier.wait()
        for line in range(1, 41):
            dues.append(store.record(job, result(line, "succeeded" if n % 2 else "skipped"))[1])

    threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert dues.count(True) == 1
    assert store.counts(job).done == 40  # type: ignore[union-attr]


# --- outputs -----------------------------------------------------------------------------------

def test_claim_outputs_first_line_wins(store, job):
    assert store.claim_outputs(job, []) == []
    assert store.claim_outputs(job, [("s3://o/a.png", 1), ("s3://o/b.png", 2),
                                     ("s3://o/a.png", 3)]) == [1, 2, 1]
    # re-claiming (a redelivered slice) is idempotent for the owner
    assert store.claim_outputs(job, [("s3://o/a.png", 1), ("s3://o/b.png", 2)]) == [1, 2]
    assert store.claim_outputs(job, [("s3://o/b.png", 7), ("s3://o/c.png", 8)]) == [2, 8]
    assert store.claim_outputs("other-job", [("s3://o/a.png", 9)]) == [9]


def test_final_lines_and_tries(store, job):
    store.record(job, result(2))
    assert store.final_lines(job, [1, 2, 3]) == [False, True, False]
    assert store.final_lines(job, []) == []
    assert [store.start_item(job, 4) for _ in range(3)] == [1, 2, 3]
    assert store.tries(job, 4) == 0
    assert [store.count_try(job, 4) for _ in range(2)] == [1, 2]
    assert store.tries(job, 4) == 2


# --- results -----------------------------------------------------------------------------------

def test_iter_results_in_line_order_with_gaps(store, job):
    recorded = {1, 2, 5, 9, 10}
    for line in sorted(recorded, reverse=True):
        store.record(job, result(line, "failed" if line == 5 else "succeeded",
                                 "bad_image" if line == 5 else None))
    got = list(store.iter_results(job, 11, batch=3))
    assert [ln for ln, _ in got] == list(range(1, 12))
    for ln, rec in got:
        if ln in recorded:
            assert rec is not None and rec["line"] == ln
        else:
            assert rec is None
    assert list(store.iter_results(job, 0)) == []
    failed = list(store.iter_failed(job))
    assert [r["line"] for r in failed] == [5]


def test_import_results(store, job):
    store.record(job, result(2, "failed", "timeout"))
    stored = [result(1), result(2, "skipped"), result(3, "failed", "bad_image"), result(1)]
    assert store.import_results(job, stored) == 2  # lines 1 and 3 are new; 2 is an upgrade
    assert done_counts(store) == (1, 1, 1)
    assert store.import_results(job, stored) == 0
    assert done_counts(store) == (1, 1, 1)


# --- cancel and resume -------------------------------------------------------------------------

def test_cancel_then_resume(store, job):
    store.advance(job, 0, 0, 100, 6, False, 5, 5)
    store.record(job, result(1))
    store.record(job, result(2, "skipped"))
    store.record(job, result(3, "failed", "bad_image"))
    assert not store.cancelled(job)
    store.request_cancel(job)
    assert store.cancelled(job) and store.counts(job).cancelled  # type: ignore[union-attr]
    store.record(job, result(4, "failed", "cancelled"))
    store.record(job, result(5, "failed", "cancelled"))
    store.set(job, state="done", finished=123.0, finalize_queued=1)
    assert done_counts(store) == (1, 1, 3)

    assert store.reset_for_resume(job) == 1
    assert not store.cancelled(job)
    assert done_counts(store) == (1, 1, 1)
    assert [store.result(job, n) is None for n in range(1, 6)] == [False] * 3 + [True] * 2
    f = store.fields(job)
    assert (f["epoch"], f["cursor_offset"], f["cursor_line"], f["state"]) == ("1", "0", "1",
                                                                             "queued")
    assert "finalize_queued" not in f and "expanded" not in f and "finished" not in f
    c = store.counts(job)
    assert c is not None and c.total is None and c.expanded_items == 0

    # the old expansion is stale; the new one redoes the slices without double counting
    assert store.advance(job, 0, 100, 200, 6, True, 0, 0) == -1
    assert store.advance(job, 1, 0, 100, 6, True, 5, 5) == 0
    assert store.counts(job).total == 5  # type: ignore[union-attr]
    assert store.record(job, result(4)) == (1, False)
    assert store.record(job, result(5)) == (1, True)


def test_resume_of_a_cancelled_job_with_no_cancelled_items(store, job):
    store.record(job, result(1))
    store.request_cancel(job)
    assert store.reset_for_resume(job) == 1
    assert not store.cancelled(job)
    assert done_counts(store) == (1, 0, 0)


def test_resume_without_cancel_keeps_cancelled_failures(store, job):
    store.record(job, result(1, "failed", "cancelled"))
    assert store.reset_for_resume(job) == 1
    assert store.result(job, 1) is not None
    assert done_counts(store) == (0, 0, 1)
    assert store.reset_for_resume(job) == 2


def test_resume_after_finalize_can_finalize_again(store, job):
    expand_all(store, job, 1)
    assert store.record(job, result(1, "failed", "timeout")) == (1, True)
    store.reset_for_resume(job)
    assert expand_all(store, job, 1, epoch=1) == 1


def test_expire_sets_ttls_and_resume_removes_them(store, job, redis_server):
    r = redis_server.client()
    store.advance(job, 0, 0, 10, 2, True, 1, 1)
    store.record(job, result(1))
    store.claim_outputs(job, [("s3://o/a.png", 1)])
    store.start_item(job, 1)
    store.count_try(job, 1)
    keys = [k for k in store._all_keys(job) if r.exists(k)]
    assert len(keys) == 7
    assert all(r.ttl(k) == -1 for k in keys)
    store.expire(job)
    assert all(0 < r.ttl(k) <= 3600 for k in keys), {k: r.ttl(k) for k in keys}
    store.reset_for_resume(job)
    assert all(r.ttl(k) == -1 for k in (store.key(job), store.key(job, "results")))


def test_expired_job_is_gone(redis_server):
    store = JobStore(connect(redis_server.url), ttl_seconds=1)
    store.create(make_record("short"))
    store.record("short", result(1))
    store.expire("short")
    deadline = time.monotonic() + 5
    while store.exists("short") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not store.exists("short")
    assert store.result("short", 1) is None


# --- Redis restarts ----------------------------------------------------------------------------

def test_store_survives_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "persist", persist=True).start()
    try:
        store = JobStore(connect(server.url, retry_seconds=20))
        store.create(make_record())
        expand_all(store, JOB, 2)
        assert store.record(JOB, result(1)) == (1, False)

        server.restart()  # the script cache and every connection are gone
        assert store.record(JOB, result(2)) == (1, True)
        assert store.counts(JOB).done == 2  # type: ignore[union-attr]

        # a call made while Redis is down waits for it to come back
        server.kill()
        starter = threading.Timer(1.0, server.start)
        starter.start()
        try:
            t0 = time.monotonic()
            assert store.record(JOB, result(2)) == (0, False)
            assert time.monotonic() - t0 >= 0.5
        finally:
            starter.join()
        assert store.record_of(JOB) == make_record()
        assert done_counts(store) == (2, 0, 0)
    finally:
        server.stop()
