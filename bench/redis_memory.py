"""Redis memory per item: while a job runs (beyond the queued messages themselves) and after
it finished, with a real redis-server, the real scheduler and stand-in workers that record
every item as succeeded without running a model.

    python bench/redis_memory.py [--items 100000,1000000] [--workers 2]

For each size it prints the peak of (used memory − memory before the job − the stylize
queue and unacknowledged messages) divided by the items, the bytes the finished job keeps,
the end-to-end time, and how long ``capvst resume`` of the finished-but-cancelled job takes
to rebuild its per-line state from the stored results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.services import Cluster, Proc  # noqa: E402


def _manifest(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"content": f"c/{i:07d}.jpg", "style": f"s/{i % 50}.png"})
                     + "\n")


def _queued_bytes(r) -> int:  # type: ignore[no-untyped-def]
    total = 0
    for key in ("capvst.stylize", "unacked", "unacked_index", "capvst.schedule"):
        total += int(r.memory_usage(key, samples=0) or 0)
    return total


def run(n: int, workers: int, folder: Path) -> dict[str, float]:
    """One job of ``n`` items; the measurements."""
    manifest = folder / "m.jsonl"
    _manifest(manifest, n)
    c = Cluster(folder, None, untrained=True, chunk_size="250", expand_slice_lines="5000",
                max_queued_tasks="400", report_rows="20", lease_seconds="30",
                reconcile_interval="2")
    try:
        c.scheduler().wait_ready()
        standin = Proc("standin", [sys.executable, "-m", "celery", "-A", "tests.standin_worker",
                                   "worker", "-Q", "capvst.stylize", "-c", str(workers), "-n",
                                   "standin@%h", "--loglevel", "WARNING"], c.env, folder)
        c.procs.append(standin)
        time.sleep(5)
        r = c.redis.client()
        base = int(r.info("memory")["used_memory"])
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                used = int(r.info("memory")["used_memory"]) - base - _queued_bytes(r)
                peak[0] = max(peak[0], used)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.monotonic()
        proc = c.submit(str(manifest), "--output", str(folder / "out"), "--wait", "--json",
                        timeout=3600)
        elapsed = time.monotonic() - t0
        stop.set()
        t.join()
        job = json.loads(proc.stdout)["job"]
        time.sleep(3)
        held = sum(int(r.memory_usage(k, samples=0) or 0) for k in r.keys(f"capvst:job:{job}*"))
        # resume of the (finished) job as if it had been cancelled: rebuild from storage
        r.hset(f"capvst:job:{job}", "cancelled", "bench")
        r.hset(f"capvst:job:{job}", "state", "cancelled")
        t1 = time.monotonic()
        res = c.capvst("resume", job, "--output", str(folder / "out"), timeout=600)
        resume = time.monotonic() - t1
        assert res.returncode == 0, res.stderr
        return {"items": n, "bytes_per_running_item": peak[0] / n, "finished_job_bytes": held,
                "seconds": elapsed, "resume_seconds": resume}
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", default="100000,1000000")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"{'items':>9} {'B/item running':>15} {'finished job B':>15} {'job s':>8} "
          f"{'resume s':>9}")
    rows = []
    for n in (int(x) for x in args.items.split(",")):
        with tempfile.TemporaryDirectory(prefix="capvst-redis-mem-") as tmp:
            m = run(n, args.workers, Path(tmp))
        rows.append(m)
        print(f"{n:>9} {m['bytes_per_running_item']:>15.1f} {m['finished_job_bytes']:>15.0f} "
              f"{m['seconds']:>8.1f} {m['resume_seconds']:>9.1f}", flush=True)
    worst = max(r["bytes_per_running_item"] for r in rows)
    held = [r["finished_job_bytes"] for r in rows]
    print(f"verdict: at most {worst:.0f} bytes per running item (target 100); a finished job "
          f"keeps {min(held):.0f}-{max(held):.0f} bytes whatever its size")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
