"""Job state in a real redis-server: idempotent records, the expansion cursor, finalize,
cancel and resume, leases, and a footprint that does not grow with finished jobs."""

from __future__ import annotations

import threading
import time

import pytest

from capvst.jobs import ACTIVE, JOBS_INDEX, JobRecord, JobStore, connect
from capvst.manifest import JobOptions
from capvst.results import ErrorInfo, ItemResult
from tests.services import RedisServer

JOB = "j-0001"


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server) -> JobStore:
    return JobStore(connect(redis_server.url, retry_seconds=10), ttl_seconds=3600,
                    lease_seconds=5)


def make_record(job: str = JOB, created: float = 1_700_000_000.5) -> JobRecord:
    return JobRecord(id=job, manifest="s3://in/m/manifest.jsonl", base="s3://in/m/manifest.jsonl",
                     output="s3://out/run", options=JobOptions(mode="artistic", max_size=512),
                     format="jsonl", created=created)


@pytest.fixture
def job(store) -> str:
    store.create(make_record())
    return JOB


def result(line: int, status: str = "succeeded", code: str | None = None, **kw) -> ItemResult:
    return ItemResult(line=line, content=f"s3://in/c{line}.jpg", style="s3://in/s.jpg",
                      output=f"s3://out/run/c{line}__s.png", status=status,  # type: ignore
                      error=ErrorInfo(code=code, message=code) if code else None, attempts=1,
                      seconds=0.5, worker=kw.pop("worker", "w1"), model="untrained", **kw)


def done_counts(store: JobStore, job: str = JOB) -> tuple[int, int, int]:
    c = store.counts(job)
    assert c is not None
    return c.succeeded, c.skipped, c.failed


def expand_all(store: JobStore, job: str, items: int, valid: int | None = None,
               epoch: int = 0, failures=()) -> int:
    """One slice from offset 0 to EOF; returns advance's answer."""
    return store.advance(job, epoch, 0, 1000, items + 1, True, items,
                         items if valid is None else valid, failures)


def stored(store: JobStore, job: str = JOB) -> list[ItemResult]:
    return [ItemResult.from_json(x) for x in store.inbox_peek(job, 10_000)]


# --- the job -----------------------------------------------------------------------------------

def test_create_and_read_back(store, redis_server):
    rec = make_record()
    assert not store.exists(JOB) and store.record_of(JOB) is None and store.counts(JOB) is None
    store.create(rec)
    assert store.exists(JOB) and store.record_of(JOB) == rec
    c = store.counts(JOB)
    assert c is not None
    assert (c.state, c.total, c.valid, c.expanded_items, c.done) == ("queued", None, None, 0, 0)
    assert (c.cancelled, c.created, c.started, c.finished) == (False, rec.created, None, None)
    r = redis_server.client()
    assert r.zscore(JOBS_INDEX, JOB) == rec.created and r.sismember(ACTIVE, JOB)


def test_set_never_recreates_an_unknown_job(store, redis_server):
    store.set("ghost", state="running")
    assert not redis_server.client().exists("capvst:job:ghost")


# --- record ------------------------------------------------------------------------------------

def test_record_counts_each_line_once(store, job):
    assert store.record(job, [result(1)]) == (1, False)
    assert store.record(job, [result(1)]) == (0, False)
    assert store.record(job, [result(2, "failed", "bad_image"), result(3, "skipped")]) == (
        2, False)
    assert store.record(job, [result(2, "failed", "bad_image")]) == (0, False)
    assert done_counts(store) == (1, 1, 1)
    assert store.ranks(job, [1, 2, 3, 4]) == [3, 1, 2, 0]
    assert [r.line for r in stored(store)] == [1, 2, 3]  # one stored copy per change


@pytest.mark.parametrize("worse,better", [
    ("failed", "skipped"), ("failed", "succeeded"), ("skipped", "succeeded")])
def test_a_better_result_replaces_a_worse_one(store, job, worse, better):
    store.record(job, [result(1, worse, "timeout" if worse == "failed" else None)])
    assert store.record(job, [result(1, better, worker="w2")]) == (1, False)
    assert store.ranks(job, [1]) == [{"skipped": 2, "succeeded": 3}[better]]
    assert store.counts(job).done == 1  # type: ignore[union-attr]
    expected = {"succeeded": 0, "skipped": 0, "failed": 0, better: 1}
    assert done_counts(store) == (expected["succeeded"], expected["skipped"], expected["failed"])


@pytest.mark.parametrize("better,worse", [
    ("succeeded", "skipped"), ("succeeded", "failed"), ("skipped", "failed")])
def test_a_worse_result_never_replaces_a_better_one(store, job, better, worse):
    store.record(job, [result(1, better, worker="first")])
    assert store.record(job, [result(1, worse, "model_error" if worse == "failed" else None,
                                     worker="second")]) == (0, False)
    assert [r.worker for r in stored(store)] == ["first"]
    assert store.counts(job).done == 1  # type: ignore[union-attr]


def test_record_of_an_unknown_job_is_refused_and_creates_nothing(store, redis_server):
    assert store.record("ghost", [result(1)]) == (-1, False)
    assert redis_server.client().keys("capvst:job:ghost*") == []


def test_concurrent_duplicate_records_count_once(store, job):
    barrier = threading.Barrier(8)
    answers: list = []

    def go(n: int) -> None:
        barrier.wait()
        for line in range(1, 51):
            answers.append(store.record(job, [result(line, worker=f"w{n}")])[0])

    threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers.count(1) == 50 and answers.count(0) == 350
    assert done_counts(store) == (50, 0, 0)


def test_inbox_peek_and_drop(store, job):
    store.record(job, [result(n) for n in range(1, 6)])
    assert store.inbox_length(job) == 5
    assert [ItemResult.from_json(x).line for x in store.inbox_peek(job, 2)] == [1, 2]
    store.inbox_drop(job, 2)
    assert [r.line for r in stored(store)] == [3, 4, 5]


# --- expansion cursor and finalize -------------------------------------------------------------

def test_advance_is_a_compare_and_set_on_epoch_and_offset(store, job):
    bad = [ItemResult(line=3, status="failed", error=ErrorInfo(code="invalid_item",
                                                               message="x"))]
    assert store.advance(job, 0, 0, 500, 11, False, 10, 9, bad) == 0
    # the same slice again (a redelivered expand task) and a stale epoch are refused, and
    # their failure records are not applied twice
    assert store.advance(job, 0, 0, 500, 11, False, 10, 9, bad) == -1
    assert store.advance(job, 1, 500, 900, 21, False, 10, 10) == -1
    assert store.counts(job).failed == 1  # type: ignore[union-attr]
    f = store.fields(job)
    assert (f["cursor_offset"], f["cursor_line"]) == ("500", "11")
    assert store.advance(job, 0, 500, 900, 21, True, 10, 10) == 0
    c = store.counts(job)
    assert (c.total, c.valid, c.expanded_items) == (20, 19, 20)  # type: ignore[union-attr]


def test_finalize_due_on_the_record_that_completes_the_job(store, job):
    assert expand_all(store, job, 3) == 0
    assert store.record(job, [result(1), result(2)]) == (2, False)
    assert store.record(job, [result(3, "failed", "bad_image")]) == (1, True)
    assert store.fields(job)["state"] == "finalizing"
    # the same result again is not a second "due"
    assert store.record(job, [result(3, "failed", "bad_image")]) == (0, False)


def test_no_finalize_before_expansion_reaches_eof(store, job):
    assert store.advance(job, 0, 0, 100, 3, False, 2, 2) == 0
    assert store.record(job, [result(1), result(2)]) == (2, False)
    assert store.advance(job, 0, 100, 200, 5, True, 2, 2) == 0
    assert store.record(job, [result(3), result(4)]) == (2, True)


def test_finalize_due_on_advance_when_everything_was_recorded(store, job):
    assert store.record(job, [result(1)]) == (1, False)
    assert expand_all(store, job, 1) == 1


def test_empty_manifest_is_due_at_eof(store, job):
    assert expand_all(store, job, 0) == 1


def test_finalize_due_exactly_once_under_concurrency(store, job):
    expand_all(store, job, 200)
    barrier = threading.Barrier(4)
    dues: list[bool] = []

    def go(k: int) -> None:
        barrier.wait()
        for line in range(1 + k, 201, 4):
            dues.append(store.record(job, [result(line)])[1])

    threads = [threading.Thread(target=go, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert dues.count(True) == 1


def test_claim_outputs_first_line_wins(store, job):
    assert store.claim_outputs(job, [("s3://o/a.png", 1), ("s3://o/b.png", 2),
                                     ("s3://o/a.png", 3)]) == [1, 2, 1]
    # a line re-claiming its own output (a re-run slice) keeps it; others still lose
    assert store.claim_outputs(job, [("s3://o/a.png", 1), ("s3://o/a.png", 7)]) == [1, 1]


# --- cancel and resume -------------------------------------------------------------------------

def test_cancelled_records_count_only_under_their_cancellation(store, job):
    expand_all(store, job, 4)
    token = store.request_cancel(job)
    assert store.request_cancel(job) == token  # one cancellation, one token
    assert store.record(job, [result(1, "failed", "cancelled")], cancel_token="stale") == (
        0, False)
    assert store.record(job, [result(1, "failed", "cancelled")], cancel_token=token) == (
        1, False)
    # a resume in between voids the token: a slow worker's cancellations do not count
    store.uncancel(job, 4)
    assert store.record(job, [result(2, "failed", "cancelled")], cancel_token=token) == (
        0, False)
    assert store.ranks(job, [1, 2]) == [0, 0]


def test_uncancel_reopens_only_cancelled_lines_in_bounded_steps(store, job):
    n = 100_000
    expand_all(store, job, n)
    token = store.request_cancel(job)
    cancelled = [result(ln, "failed", "cancelled") for ln in range(1, n + 1, 3)]
    for i in range(0, len(cancelled), 5000):
        store.record(job, cancelled[i:i + 5000], cancel_token=token)
    store.record(job, [result(2, "failed", "bad_image"), result(5)])
    before = store.counts(job)
    assert before.failed == len(cancelled) + 1  # type: ignore[union-attr]
    t0 = time.monotonic()
    assert store.uncancel(job, n, span=8192) == len(cancelled)
    assert time.monotonic() - t0 < 30
    assert done_counts(store) == (1, 0, 1)
    assert store.ranks(job, [1, 2, 4, 5]) == [0, 1, 0, 3]
    assert not store.cancelled(job)


def test_reset_for_resume_bumps_the_epoch_and_restarts_expansion(store, job):
    expand_all(store, job, 2)
    store.record(job, [result(1), result(2)])
    assert store.reset_for_resume(job) == 1
    f = store.fields(job)
    assert (f["state"], f["cursor_offset"], f["cursor_line"], f["epoch"]) == (
        "queued", "0", "1", "1")
    assert "expanded" not in f and "finalize_due" not in f
    assert store.ranks(job, [1, 2]) == [3, 3]  # final lines stay final
    assert expand_all(store, job, 2, epoch=1) == 1


# --- finish: a finished job's footprint is constant -------------------------------------------

def test_finish_keeps_a_summary_and_drops_per_line_state(store, job, redis_server):
    n = 20_000
    expand_all(store, job, n)
    store.claim_outputs(job, [(f"s3://o/{i}.png", i) for i in range(1, n + 1)])
    for i in range(1, n + 1, 5000):
        store.record(job, [result(ln) for ln in range(i, min(n, i + 4999) + 1)])
    r = redis_server.client()
    assert store.finish(job, {"state": "done"}) is False  # results still in the inbox
    store.inbox_drop(job, n)
    assert store.finish(job, {"state": "done", "n_succeeded": n, "report": "s3://x"}) is True
    assert sorted(r.keys("capvst:job:*")) == [f"capvst:job:{JOB}"]
    assert 0 < r.ttl(f"capvst:job:{JOB}") <= 3600
    assert not r.sismember(ACTIVE, JOB)
    assert r.memory_usage(f"capvst:job:{JOB}") < 4096
    c = store.counts(job)
    assert c is not None and c.state == "done" and c.succeeded == n


def test_a_result_after_the_report_asks_for_a_refinalize(store, job, redis_server):
    expand_all(store, job, 2)
    store.record(job, [result(1), result(2, "failed", "timeout")])
    store.inbox_drop(job, 2)
    assert store.finish(job, {"state": "done"})
    # a late copy of the chunk finished the timed-out item after the report was written
    assert store.record(job, [result(2)]) == (1, True)
    assert store.record(job, [result(2, "failed", "bad_image")]) == (0, False)
    f = store.fields(job)
    assert f["refinalize"] == "1" and redis_server.client().sismember(ACTIVE, JOB)
    assert [ItemResult.from_json(x).status for x in store.late_results(job)] == ["succeeded"]
    assert store.finish(job, {"state": "done"}, late_consumed=1)
    assert "refinalize" not in store.fields(job)


# --- leases ------------------------------------------------------------------------------------

def test_leases_live_while_renewed_and_name_what_was_in_flight(store, job):
    assert store.lease_take("t1", "run1", job, [1, 2], items=[{"line": 1}]) is None
    assert store.alive("t1")
    store.lease_lines("t1", [2])
    prev = store.lease_take("t1", "run2", job, [1, 2])  # the next run of the same task
    assert prev is not None and prev.token == "run1" and prev.lines == (2,)
    store.mark_dead("t1")
    assert not store.alive("t1") and store.lease_of("t1").dead  # type: ignore[union-attr]
    store.lease_drop("t1", "run2")
    assert store.lease_of("t1") is None and store.leases() == []


def test_an_unrenewed_lease_runs_out(store, job):
    store.lease_seconds = 0.5
    store.lease_take("t2", "run1", job, [3])
    assert store.alive("t2")
    time.sleep(1.0)
    assert not store.alive("t2")
    assert store.lease_of("t2") is not None  # what it had in flight is still known


def test_named_locks(store):
    assert store.hold("capvst:lock", "a", 5) and store.hold("capvst:lock", "a", 5)
    assert not store.hold("capvst:lock", "b", 5)
    store.release("capvst:lock", "a")
    assert store.hold("capvst:lock", "b", 5)


def test_deaths_count_only_unfinished_lines(store, job):
    store.record(job, [result(1)])
    store.add_deaths(job, [1, 2])
    store.add_deaths(job, [2])
    assert store.deaths(job, [1, 2, 3]) == [0, 2, 0]
    store.record(job, [result(2, "failed", "model_error")])
    assert store.deaths(job, [2]) == [0]  # a result clears it


# --- Redis restarts ----------------------------------------------------------------------------

def test_store_survives_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "persist", persist=True).start()
    try:
        store = JobStore(connect(server.url, retry_seconds=20))
        store.create(make_record())
        expand_all(store, JOB, 2)
        assert store.record(JOB, [result(1)]) == (1, False)

        server.restart()  # the script cache and every connection are gone
        assert store.record(JOB, [result(2)]) == (1, True)
        assert store.counts(JOB).done == 2  # type: ignore[union-attr]

        # a call made while Redis is down waits for it to come back
        server.kill()
        starter = threading.Timer(1.0, server.start)
        starter.start()
        try:
            t0 = time.monotonic()
            assert store.record(JOB, [result(2)]) == (0, False)
            assert time.monotonic() - t0 >= 0.5
        finally:
            starter.join()
        assert store.record_of(JOB) == make_record()
        assert done_counts(store) == (2, 0, 0)
    finally:
        server.stop()
