"""What the opt-in float32 cWCT costs in accuracy and gains in speed, against float64 (the
original's precision), on the reference cases in tests/data/reference (their weights are the
seeded untrained networks), else the bundled examples.

    python bench/transform_precision.py [--device cuda] [--reference PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from capvst import images, load_model
from capvst.model import cwct
from capvst.stylize import resolve_device

HERE = Path(__file__).resolve().parent


def _cases(ref: Path | None):  # type: ignore[no-untyped-def]
    if ref and (ref / "cases.json").is_file():
        for c in json.loads((ref / "cases.json").read_text())["cases"]:
            if "content_mask" in c or len(c["style"]) > 1 or "alpha_c" in c:
                continue
            weights = ref / "weights" / f"{c['weights']}.pt"
            yield (c["name"], c["mode"], ref / "images" / c["content"],
                   ref / "images" / c["style"][0], c["max_size"],
                   weights if weights.is_file() else None)
        return
    ex = HERE.parent / "capvst" / "examples"
    for mode in ("photorealistic", "artistic"):
        yield (f"examples-{mode}", mode, ex / "chelsea.jpg", ex / "rocket.jpg", 320, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reference", default=os.environ.get(
        "CAPVST_REFERENCE_DIR", str(HERE.parent / "tests" / "data" / "reference")))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    print(f"device {dev}")
    print(f"{'case':<38} {'max level diff':>14} {'identical %':>11} {'f64 ms':>8} "
          f"{'f32 ms':>8} {'f64/f32':>8}")
    for name, mode, content, style, size, weights in _cases(Path(args.reference)):
        net = load_model(mode, str(weights) if weights else None, warn=False).net.to(dev)
        with torch.inference_mode():
            zc = net(images.to_tensor(images.resize(images.decode_image(content), size)).to(dev))
            zs = net(images.to_tensor(images.resize(images.decode_image(style), size)).to(dev))
            out = {}
            times = {}
            for dtype in (torch.float64, torch.float32):
                ts = []
                for _ in range(args.repeat):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    z = cwct.transfer(zc, [cwct.style_moments(zs, dtype)], dtype=dtype)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                times[dtype] = statistics.median(ts)
                out[dtype] = images.to_uint8(net.inverse(z)).astype(np.int16)
        diff = np.abs(out[torch.float64] - out[torch.float32])
        print(f"{name:<38} {int(diff.max()):>14} {100 * (diff == 0).mean():>11.3f} "
              f"{1000 * times[torch.float64]:>8.1f} {1000 * times[torch.float32]:>8.1f} "
              f"{times[torch.float64] / times[torch.float32]:>7.2f}x")


if __name__ == "__main__":
    main()
