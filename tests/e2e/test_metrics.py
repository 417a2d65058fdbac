"""Prometheus metrics of a real worker and scheduler: after a small job with one failing item
the worker's counters equal the report's counts, the prefork pool process's samples reach
the parent's /metrics, and they survive the death of that pool process."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.helpers import put_inputs, put_manifest, report, simple_lines, submit
from tests.reliability.helpers import wait_done as wait_job
from tests.services import Cluster, free_port, wait_for
from tests.test_deploy_files import METRICS

pytestmark = pytest.mark.slow


def _text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` on ``port``: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(_text(port)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def kinds(*ports: int) -> dict[str, tuple[str, set[str]]]:
    """What the endpoints serve, as tests/test_deploy_files.py's METRICS writes it."""
    out: dict[str, tuple[str, set[str]]] = {}
    for port in ports:
        for f in text_string_to_metric_families(_text(port)):
            name = f.name + "_total" if f.type == "counter" else f.name
            labels = {k for s in f.samples for k in s.labels} - {"le"}
            out[name] = (f.type, labels)
    return out


def total(samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_worker_and_scheduler_metrics_match_the_report(tmp_path, moto_server, s3, bucket):
    wport, sport = free_port(), free_port()
    c = Cluster(tmp_path, moto_server.url)
    try:
        put_inputs(s3, bucket, 4, size=64)
        lines = simple_lines(4)  # c0 s0, c1 s1, c2 s0, c3 s1
        lines[3]["mode"] = "artistic"
        lines.append({"content": "missing.jpg", "style": "s0.png"})  # fails not_found
        manifest = put_manifest(s3, bucket, lines)
        c.scheduler(extra_env={"CAPVST_METRICS_PORT": str(sport)}).wait_ready()
        tmp = tmp_path / "worker-tmp"  # where the worker's multiprocess folder goes
        tmp.mkdir()
        # one item per forward pass, so that each item asks the style cache once (a batch
        # shares one lookup)
        w = c.worker("w1", extra_env={"CAPVST_METRICS_PORT": str(wport),
                                      "CAPVST_BATCH_SIZE": "1",
                                      "TMPDIR": str(tmp)}).wait_ready()
        assert f"Prometheus metrics on port {wport}" in w.log()

        def loaded():
            x = scrape(wport)
            return x if total(x, "capvst_model_load_seconds") > 0 else None

        before = wait_for(loaded, 120, "the pool process's model load time")
        assert total(before, "capvst_items_total") == 0
        job = submit(c, manifest, f"s3://{bucket}/out", "--max-size", "64")
        st = wait_job(c, job)
        assert (st["succeeded"], st["failed"]) == (4, 1), st

        rows = report(s3, bucket, "out", job)
        expected = Counter((r["status"], (r["error"] or {}).get("code") or "") for r in rows)
        m = scrape(wport)
        got: Counter[tuple[str, str]] = Counter()
        for (n, ls), v in m.items():
            if n == "capvst_items_total" and v:
                got[dict(ls)["status"], dict(ls)["code"]] += int(v)
        assert got == expected == Counter({("succeeded", ""): 4, ("failed", "not_found"): 1})
        assert total(m, "capvst_items_total", mode="artistic") == 1
        assert total(m, "capvst_items_total", mode="photorealistic") == 4
        # every item was fetched; the four good ones went through every stage
        assert total(m, "capvst_stage_seconds_count", stage="fetch") == 5
        for stage in ("decode", "model", "encode", "upload"):
            assert total(m, "capvst_stage_seconds_count", stage=stage) == 4, stage
        assert total(m, "capvst_stage_seconds_sum", stage="model") > 0
        # statistics per (mode, style): photorealistic s0 twice, s1 once; artistic s1 once
        assert total(m, "capvst_style_cache_hits_total") == 1
        assert total(m, "capvst_style_cache_misses_total") == 3
        assert total(m, "capvst_device_memory_bytes") > 10_000_000

        # exactly the names, kinds and labels the dashboard and KEDA rely on
        assert kinds(wport, sport) == METRICS
        sm = scrape(sport)
        assert total(sm, "capvst_items_expanded_total") == 5
        assert total(sm, "capvst_jobs", state="done") == 1
        assert total(sm, "capvst_jobs", state="running") == 0

        # the pool process dies: its counters stay, its gauges go, the new one reports
        (child,) = w.children()
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: w.children() and w.children() != [child], 60, "a new pool process")
        after = wait_for(loaded, 120, "the new process's gauges")
        assert total(after, "capvst_items_total") == 5
        assert total(after, "capvst_stage_seconds_count", stage="fetch") == 5
        (folder,) = tmp.glob("capvst-metrics-*")
        files = os.listdir(folder)
        assert f"counter_{child}.db" in files  # the dead process's counts stay
        assert not [n for n in files if n.startswith("gauge_live") and
                    n.endswith(f"_{child}.db")]  # its gauges are gone
    finally:
        c.stop()
    assert not folder.exists()  # removed when the worker exits
