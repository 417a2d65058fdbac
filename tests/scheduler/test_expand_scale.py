"""A 100,000-line manifest through the real scheduler with bounded memory.

The stylize side is a stand-in (tests/standin_worker.py) that records results without model
work, so the test measures expansion, job state and the report, not inference.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import psutil
import pytest

from tests.services import Cluster, Proc

pytestmark = pytest.mark.slow

LINES = 100_000


def _write_manifest(path, n):
    with open(path, "w") as fh:
        for i in range(n):
            # 50 styles: items sharing a style are grouped into the same tasks
            fh.write(json.dumps({"content": f"content/{i:07d}.jpg",
                                 "style": f"style/{i % 50}.jpg"}) + "\n")


class PeakRss:
    """Samples the RSS of a process tree until stopped; keeps the peak per process."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    rss = p.memory_info().rss
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak.values())


def test_100k_line_manifest_bounded_memory(tmp_path):
    manifest = tmp_path / "big.jsonl"
    _write_manifest(manifest, LINES)
    c = Cluster(tmp_path, None, chunk_size="250", expand_slice_lines="5000",
                max_queued_tasks="200", report_rows="20")
    try:
        sched = c.scheduler().wait_ready()
        standin = Proc("standin", [sys.executable, "-m", "celery", "-A", "tests.standin_worker",
                                   "worker", "-Q", "capvst.stylize", "-c", "2", "-n",
                                   "standin@%h", "--loglevel", "INFO"], c.env, tmp_path)
        c.procs.append(standin)
        standin.wait_ready()
        rss = PeakRss(sched.pid)
        t0 = time.monotonic()
        proc = c.submit(str(manifest), "--output", str(tmp_path / "out"), "--wait", "--json",
                        timeout=900)
        elapsed = time.monotonic() - t0
        peak = rss.stop()
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout)
        assert (result["total"], result["succeeded"], result["failed"]) == (LINES, LINES, 0)
        report = tmp_path / "out" / "_capvst" / result["job"] / "report.jsonl"
        with open(report) as fh:
            lines = [json.loads(x)["line"] for x in fh]
        assert lines == list(range(1, LINES + 1))
        print(f"\n100k-line manifest: {elapsed:.1f} s end to end, scheduler peak RSS "
              f"{peak / 2**20:.0f} MiB")
        # the scheduler never holds the manifest: far below what 100k items would need
        assert peak < 200 * 2**20, f"scheduler peak RSS {peak / 2**20:.0f} MiB"
    finally:
        c.stop()
