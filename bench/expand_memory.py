"""Scheduler expansion against manifest size: throughput and peak memory stay flat.

Runs the real expansion code (scheduler.service.expand_slice) in this process against a
private redis-server; stylize tasks are counted instead of sent, so only expansion is measured.

    python bench/expand_memory.py [--lines 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from capvst.jobs import JobRecord, JobStore, connect
from capvst.manifest import JobOptions
from capvst.settings import Settings
from capvst.storage import Storage
from scheduler.service import Context, expand_slice


def _redis(folder: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--dir", folder], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            connect(url).ping()
            break
        except Exception:
            time.sleep(0.05)
    return proc, url


def run(n: int, folder: str, url: str) -> tuple[float, int]:
    """Expand an n-line manifest; (seconds, stylize tasks produced)."""
    path = os.path.join(folder, f"m{n}.jsonl")
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"content": f"c/{i:08d}.jpg", "style": f"s/{i % 97}.jpg"}) + "\n")
    settings = Settings(broker_url=url, local_root=folder, max_queued_tasks=10**9)
    jobs = JobStore(connect(url))
    job = f"bench-{n}"
    jobs.create(JobRecord(id=job, manifest=path, base=path, output=os.path.join(folder, "out"),
                          options=JobOptions(), created=time.time()))
    pending: list[dict] = [dict(job=job, epoch=0, offset=0, line=1)]
    tasks = 0

    def send(name, kwargs, argsrepr, countdown=None):  # type: ignore[no-untyped-def]
        nonlocal tasks
        if name == "capvst.expand":
            pending.append(kwargs)
        elif name == "capvst.stylize":
            tasks += 1

    ctx = Context(settings, Storage(settings), jobs, send, lambda: 0)
    t0 = time.perf_counter()
    while pending:
        expand_slice(ctx, **pending.pop())
    elapsed = time.perf_counter() - t0
    assert int(jobs.fields(job)["total"]) == n
    jobs.r.flushdb()
    os.unlink(path)
    return elapsed, tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", default="10000,100000")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--redis", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # one size in a fresh process, so its peak RSS is its own
        elapsed, tasks = run(args.one, args.folder, args.redis)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"seconds": elapsed, "tasks": tasks, "rss": rss}))
        return
    folder = tempfile.mkdtemp(prefix="capvst-bench-")
    proc, url = _redis(folder)
    try:
        print(f"{'lines':>9} {'seconds':>8} {'lines/s':>9} {'tasks':>7} {'peak RSS MiB':>12} "
              f"{'RSS vs smallest':>15}")
        base = None
        for n in [int(x) for x in args.lines.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--redis", url,
                                  "--folder", folder], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r["rss"]
            print(f"{n:>9} {r['seconds']:>8.1f} {n / r['seconds']:>9.0f} {r['tasks']:>7} "
                  f"{r['rss'] / 2**20:>12.0f} {r['rss'] / base:>14.2f}x")
    finally:
        proc.terminate()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
