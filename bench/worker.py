"""Throughput of one real stylize worker (real redis-server, moto's S3 server over HTTP, the
real scheduler) against the same items through ``capvst stylize`` in one process; and with a
stand-in model of fixed duration, how much of the I/O the worker's pipeline hides.

    python bench/worker.py [--items 24] [--size 256] [--standin 1.5] [--standin-items 16]

Three runs of the same items from the S3 server: ``capvst stylize`` with every content on one
command line (one process, timed from its start to its exit: interpreter, model load, items);
``Stylizer`` in a plain loop inside this already running process (no start, model loaded: the
strictest yardstick, shown for reference); one queued worker that is already running, timed
from ``capvst-submit --wait`` to its exit (submission, expansion, items, finalize and report).
The verdict compares the worker with the command. All use the reference weights as checkpoint
files and PyTorch's default threads. Ratios are measured side by side in one run; absolute
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import boto3  # noqa: E402

from tests.data import image_bytes  # noqa: E402
from tests.services import AWS_ENV, Cluster, MotoServer  # noqa: E402


def _inputs(s3, bucket: str, n: int, size: tuple[int, int], fmt: str = "JPEG") -> None:
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"in/c{i}.jpg",
                      Body=image_bytes(size, seed=i, fmt=fmt))
    s3.put_object(Bucket=bucket, Key="in/s.png", Body=image_bytes((size[0] // 2, size[1] // 2),
                                                                  seed=99))


def _manifest(s3, bucket: str, n: int, max_size: int) -> str:
    body = "".join(json.dumps({"content": f"c{i}.jpg", "style": "s.png",
                               "max_size": max_size}) + "\n" for i in range(n))
    s3.put_object(Bucket=bucket, Key="in/m.jsonl", Body=body.encode())
    return f"s3://{bucket}/in/m.jsonl"


def plain_loop(c: Cluster, bucket: str, n: int, max_size: int) -> float:
    """Items per second through Stylizer, one after another, in this process."""
    for k, v in c.env.items():
        if k.startswith(("CAPVST_", "AWS_")):
            os.environ[k] = v
    os.environ.pop("CAPVST_LOCAL_ROOT", None)
    from capvst import images, load_model
    from capvst.settings import Settings
    from capvst.storage import Storage
    from capvst.stylize import Stylizer

    s = Settings()
    store = Storage(s, confine_local=False)
    uri, _pin = s.checkpoint_for("photorealistic")
    stylizer = Stylizer(load_model("photorealistic", uri, storage=store), "cpu")
    t0 = time.perf_counter()
    for i in range(n):
        content = images.decode_image(store.read(f"s3://{bucket}/in/c{i}.jpg"))
        style = images.decode_image(store.read(f"s3://{bucket}/in/s.png"))
        pixels = stylizer.stylize(content, [style], max_size=max_size,
                                  style_keys=[f"s3://{bucket}/in/s.png"])
        store.write(f"s3://{bucket}/loop/c{i}.png", images.encode(pixels, "png"))
    return n / (time.perf_counter() - t0)


def command(c: Cluster, bucket: str, n: int, max_size: int, out: Path) -> float:
    """Items per second of ``capvst stylize`` over all items in one process, start to exit."""
    env = {k: v for k, v in c.env.items() if k != "CAPVST_LOCAL_ROOT"}
    argv = [sys.executable, "-m", "capvst", "stylize",
            *[f"s3://{bucket}/in/c{i}.jpg" for i in range(n)],
            "--style", f"s3://{bucket}/in/s.png", "--max-size", str(max_size), "-o", str(out)]
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=3600)
    elapsed = time.perf_counter() - t0
    assert len(list(out.glob("*.png"))) == n
    return n / elapsed


def queued(c: Cluster, manifest: str, output: str) -> float:
    """Items per second of one job through the queue, from submit to its last result."""
    t0 = time.perf_counter()
    proc = c.submit(manifest, "--output", output, "--wait", "--json", timeout=3600)
    elapsed = time.perf_counter() - t0
    st = json.loads(proc.stdout)
    assert st["failed"] == 0, st
    return int(st["done"]) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--standin", type=float, default=1.5, help="stand-in model seconds")
    ap.add_argument("--standin-items", type=int, default=16)
    args = ap.parse_args()
    for k, v in AWS_ENV.items():
        os.environ.setdefault(k, v)
    with tempfile.TemporaryDirectory(prefix="capvst-bench-worker-") as tmp:
        folder = Path(tmp)
        moto = MotoServer(folder).start()
        try:
            s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
            s3.create_bucket(Bucket="bench")
            size = (args.size, args.size * 3 // 4)
            _inputs(s3, "bench", args.items, size)
            manifest = _manifest(s3, "bench", args.items, args.size)

            c = Cluster(folder / "real", moto.url, chunk_size="8")
            try:
                c.scheduler().wait_ready()
                c.worker("w1").wait_ready()
                cmd = command(c, "bench", args.items, args.size, folder / "cmd-out")
                q = queued(c, manifest, "s3://bench/out1")
                loop = plain_loop(c, "bench", args.items, args.size)
            finally:
                c.stop()
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(f"{args.items} items at {args.size} px, {os.cpu_count()} cpus, {when}")
            print(f"{'run':<44} {'items/s':>8} {'ratio':>7}")
            print(f"{'capvst stylize, all items in one process':<44} {cmd:>8.3f} {1.0:>7.2f}")
            print(f"{'Stylizer in a plain loop (no start, loaded)':<44} {loop:>8.3f} "
                  f"{loop / cmd:>7.2f}")
            print(f"{'one queued worker, submit to --wait exit':<44} {q:>8.3f} {q / cmd:>7.2f}"
                  f"  ({q / loop:.2f} of the plain loop)")

            s3.create_bucket(Bucket="standin")
            _inputs(s3, "standin", args.standin_items, (1280, 960))
            manifest = _manifest(s3, "standin", args.standin_items, 1280)
            c = Cluster(folder / "standin", moto.url, chunk_size="8",
                        standin_model_seconds=str(args.standin))
            try:
                c.scheduler().wait_ready()
                c.worker("w1").wait_ready()
                sq = queued(c, manifest, "s3://standin/out")
            finally:
                c.stop()
            ideal = 1.0 / args.standin
            print(f"{f'worker, stand-in model {args.standin} s, 1280x960 JPEG->PNG':<44} "
                  f"{sq:>8.3f} {sq / ideal:>7.2f}  (of the model-bound {ideal:.3f}/s)")
            ok = q / cmd >= 0.9 and sq / ideal >= 0.85
            print(f"verdict: queued/capvst stylize {q / cmd:.2f} (target 0.90; "
                  f"{q / loop:.2f} of the plain loop), I/O hidden {sq / ideal:.2f} "
                  f"(target 0.85): {'met' if ok else 'NOT met'}")
        finally:
            moto.stop()


if __name__ == "__main__":
    main()
