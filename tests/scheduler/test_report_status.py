"""What users read about a job: ``capvst status``, the progress line, ``summary.json`` and
``index.html`` agree with each other and say when the untrained network was used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capvst.broker import StylizePayload, TaskNames
from capvst.cli_jobs import format_status
from capvst.results import ItemResult, eta_seconds, throughput
from scheduler.client import Client, progress_line
from scheduler.report import job_folder
from tests.scheduler.engine import engine, finish, run_expansion, submit
from tests.services import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _run_job(redis_url: str, tmp_path: Path, model: str, n: int = 3):
    ctx, out = engine(redis_url, tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"content": f"c{i}.jpg", "style": "s.png"}) + "\n"
                                for i in range(n)))
    rec = submit(ctx, manifest, tmp_path / "out")
    run_expansion(ctx, out, rec)
    client = Client(ctx.settings)
    for k in out.take(TaskNames.STYLIZE.value):
        p = StylizePayload.model_validate(k)
        results = [ItemResult.of_item(i, "failed" if i.line == 1 else "succeeded",
                                      code="bad_image" if i.line == 1 else None,
                                      message="x", seconds=0.2, worker="w", model=model)
                   for i in p.items]
        _changed, due = ctx.jobs.record(p.job, results)
        assert client.status(rec.id)["untrained"] is (model == "untrained")  # while running
        if due:
            out(TaskNames.FINALIZE.value, {"job": p.job}, "")
    assert finish(ctx, out) == ["done"]
    folder = Path(job_folder(rec)[len("file://"):])
    st = client.status(rec.id)
    assert client.used_untrained(rec.id) is (model == "untrained")  # capvst report
    ctx.jobs.r.delete(ctx.jobs.key(rec.id))  # Redis forgot the job: summary.json still says
    assert client.used_untrained(rec.id, rec.output) is (model == "untrained")
    return st, json.loads((folder / "summary.json").read_text()), \
        (folder / "index.html").read_text()


def test_status_and_summary_agree_and_name_the_untrained_network(redis_server, tmp_path):
    st, summary, page = _run_job(redis_server.url, tmp_path, "untrained")
    assert st["rate_per_second"] == summary["throughput_items_per_second"] > 0
    assert st["elapsed_seconds"] == round(summary["wall_seconds"], 1)
    assert summary["untrained"] is True and summary["untrained_items"] == 3
    assert st["untrained"] is True and st["models"] == {"untrained": 3}
    assert st["errors"] == summary["errors"] == {"bad_image": 1}
    assert 'id="untrained"' in page and "UNTRAINED" in page
    assert "UNTRAINED" in format_status(st) and "bad_image 1" in format_status(st)


def test_a_trained_job_has_no_untrained_mark(redis_server, tmp_path):
    st, summary, page = _run_job(redis_server.url, tmp_path, "0123456789ab")
    assert st["untrained"] is False and summary["untrained"] is False
    assert 'id="untrained"' not in page and "UNTRAINED" not in format_status(st)


def _status(**kw):
    st = {"job": "j", "state": "running", "total": None, "expanded": 0, "done": 1,
          "succeeded": 1, "skipped": 0, "failed": 0, "queued": 0, "cancel_requested": False,
          "rate_per_second": 0.5, "eta_seconds": None, "elapsed_seconds": 2.0}
    st.update(kw)
    return st


def test_no_nonsense_progress_line_while_the_manifest_expands():
    line = progress_line(_status())
    assert line.startswith("j running: 1 done (") and "/0" not in line and "ETA" not in line
    assert "expanding the manifest: 0 items so far" in line
    assert "1/4 done" in progress_line(_status(total=4, eta_seconds=6.0))
    assert "ETA 6 s" in progress_line(_status(total=4, eta_seconds=6.0))
    text = format_status(_status())
    assert "0 so far (expanding)" in text and "eta       -" in text


def test_eta_only_once_it_means_something():
    assert eta_seconds(1, None, 5.0, False) is None       # total unknown
    assert eta_seconds(0, 10, 0.0, False) is None         # nothing done yet
    assert eta_seconds(12, 10, 1.0, False) is None        # never negative
    assert eta_seconds(5, 10, 1.0, True) is None          # finished
    assert eta_seconds(5, 10, 2.0, False) == 2.5
    assert throughput(10, 100.0, 104.0) == 2.5 and throughput(0, 1.0, 2.0) == 0.0
