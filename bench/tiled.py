"""Time and peak memory of full-resolution stylization against image size, tiled and untiled.

    python bench/tiled.py [--sizes 1,4,12,33] [--untiled-up-to 4] [--budget BYTES]
                          [--checkpoint C] [--mode M] [--device D]
    python bench/tiled.py --queue [--size 7680x4320] [--budget BYTES]

Each run is a fresh ``capvst stylize CONTENT --style S --max-size 0 --tile T`` process, so its
peak resident memory (``wait4``'s ``ru_maxrss``) is the whole process's: PyTorch, the image,
the latent and the tiles. Tiled runs use ``--tile auto`` with ``CAPVST_MEMORY_BUDGET`` set, so
the planner chooses the tile side and whether the latent goes to disk; untiled runs use
``--tile off``. The content is a reference photo resized to each size; the style is a 512×512
reference style at its own resolution. Where both ran, the two outputs are compared (levels).

``--queue`` sends one content through the real queue instead (redis-server, the scheduler and
one worker process on this machine, local storage) and reports the worker's peak memory
against its ``CAPVST_MEMORY_BUDGET``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REF = REPO / "tests" / "data" / "reference" / "images"
SIZES = {1: (1152, 864), 4: (2304, 1728), 12: (4000, 3000), 33: (7680, 4320)}


def _content(folder: Path, width: int, height: int) -> Path:
    path = folder / f"content-{width}x{height}.png"
    if not path.exists():
        img = Image.open(REF / "content" / "01.jpg").convert("RGB")
        img.resize((width, height), Image.Resampling.BICUBIC).save(path, compress_level=1)
    return path


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS bytes and exit status of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        err = proc.stderr.read().decode() if proc.stderr else ""
        print(f"  failed ({proc.returncode}): {err.strip()[-300:]}", file=sys.stderr)
    return seconds, usage.ru_maxrss * 1024, proc.returncode


def _stylize(content: Path, out: Path, tile: str, args: argparse.Namespace
             ) -> tuple[float, int, int]:
    env = dict(os.environ, CAPVST_MEMORY_BUDGET=str(args.budget))
    argv = [sys.executable, "-m", "capvst", "stylize", str(content), "--style",
            str(REF / "style" / "04.jpg"), "--max-size", "0", "--tile", tile, "--mode",
            args.mode, "--device", args.device, "-o", str(out)]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    return _run(argv, env)


def sizes(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="capvst-bench-tiled-"))
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, mode {args.mode}, device {args.device}, "
          f"CAPVST_MEMORY_BUDGET={args.budget:,}")
    print(f"{'MP':>5} {'size':>10} {'run':>8} {'seconds':>8} {'peak RSS GB':>11} "
          f"{'max diff':>8} {'identical %':>11}")
    for mp in [int(s) for s in args.sizes.split(",")]:
        w, h = SIZES.get(mp, (0, 0))
        if not w:
            side = int((mp * 1e6 * 4 / 3) ** 0.5) // 4 * 4
            w, h = side, side * 3 // 4 // 4 * 4
        content = _content(folder, w, h)
        outs = {}
        for tile in (["auto", "off"] if mp <= args.untiled_up_to else ["auto"]):
            out = folder / f"out-{w}x{h}-{tile}.png"
            secs, rss, rc = _stylize(content, out, tile, args)
            outs[tile] = out if rc == 0 else None
            diff = ident = ""
            if tile == "off" and outs.get("auto") and outs["off"]:
                a = np.asarray(Image.open(outs["auto"])).astype(np.int16)
                b = np.asarray(Image.open(outs["off"])).astype(np.int16)
                d = np.abs(a - b)
                diff, ident = str(int(d.max())), f"{(d == 0).mean() * 100:.3f}"
            name = "tiled" if tile == "auto" else "untiled"
            print(f"{w * h / 1e6:5.1f} {w}x{h:<5} {name:>8} {secs:8.1f} {rss / 1e9:11.2f} "
                  f"{diff:>8} {ident:>11}", flush=True)


def _peak_rss(pids: list[int]) -> int:
    """Largest VmHWM (peak resident set) among ``pids``, in bytes."""
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return peak


def queue(args: argparse.Namespace) -> None:
    """One big content through redis-server, the scheduler and one worker (local files)."""
    sys.path.insert(0, str(REPO))
    from tests.services import Cluster  # the same real services the end-to-end tests use

    w, h = (int(v) for v in args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="capvst-bench-queue-"))
    content = _content(root, w, h)
    (root / "style.jpg").write_bytes((REF / "style" / "04.jpg").read_bytes())
    manifest = root / "job.jsonl"
    manifest.write_text(f'{{"content": "{content.name}", "style": "style.jpg", '
                        f'"max_size": 0, "tile": "auto", "mode": "{args.mode}"}}\n')
    print(f"# {datetime.date.today()}  {w}x{h} through the queue (redis-server, scheduler, one "
          f"worker, local files), mode {args.mode}, CAPVST_MEMORY_BUDGET={args.budget:,}")
    c = Cluster(root, None, memory_budget=str(args.budget), task_time_limit="20000",
                visibility_timeout="21000", worker_modes=args.mode, lease_seconds="60")
    try:
        c.scheduler().wait_ready(300)
        worker = c.worker("w1").wait_ready(300)
        idle = _peak_rss([worker.pid, *worker.children()])
        t0 = time.perf_counter()
        done = c.submit(str(manifest), "--output", str(root / "out"), "--wait",
                        timeout=20000)
        seconds = time.perf_counter() - t0
        peak = _peak_rss([worker.pid, *worker.children()])
        print(done.stdout.strip()[-500:])
        outs = list((root / "out").glob("*.png"))
        size = Image.open(outs[0]).size if outs else None
        print(f"exit {done.returncode}; {seconds:.0f} s; output {size}; worker peak RSS "
              f"{peak / 1e9:.2f} GB, {idle / 1e9:.2f} GB before the job (PyTorch, the model), "
              f"so {(peak - idle) / 1e9:.2f} GB for the item against a budget of "
              f"{args.budget / 1e9:.2f} GB")
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,12,33", help="megapixels (1, 4, 12, 33 or any)")
    ap.add_argument("--untiled-up-to", type=float, default=4,
                    help="also run untiled up to this many megapixels")
    ap.add_argument("--budget", type=int, default=2_000_000_000,
                    help="CAPVST_MEMORY_BUDGET of the tiled runs (bytes)")
    ap.add_argument("--mode", default="photorealistic")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queue", action="store_true")
    ap.add_argument("--size", default="7680x4320")
    args = ap.parse_args()
    queue(args) if args.queue else sizes(args)


if __name__ == "__main__":
    main()
