"""Inference speed per stage and the effect of the style-statistics cache.

    python bench/model_speed.py [--device cuda] [--sizes 256,512,1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from capvst import Stylizer, load_model
from capvst.model import cwct


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, repeat):  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mode", default="photorealistic")
    args = ap.parse_args()
    st = Stylizer(load_model(args.mode, None, warn=False), args.device)
    dev = st.device
    rng = np.random.default_rng(0)
    print(f"device {dev}, mode {args.mode}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'size':>6} {'encode s':>9} {'cWCT f64 s':>10} {'decode s':>9} {'total s':>8} "
          f"{'MP/s':>6} {'cache miss s':>12} {'cache hit s':>11} {'hit speed-up':>12}")
    for size in [int(s) for s in args.sizes.split(",")]:
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        style = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        st.encode(img)  # warm-up
        t_enc, z = _timed(lambda img=img: st.encode(img), dev, args.repeat)
        stats = cwct.style_moments(st.encode(style))
        t_tr, zcs = _timed(lambda z=z, stats=stats: cwct.transfer(z, [stats]), dev, args.repeat)
        t_dec, _ = _timed(lambda zcs=zcs: st.decode(zcs), dev, args.repeat)
        total = t_enc + t_tr + t_dec
        key = f"bench-{size}"

        def miss(key=key, img=img, style=style, size=size):  # type: ignore[no-untyped-def]
            st._cache.clear()
            return st.stylize(img, [style], max_size=size, style_keys=[key])

        def hit(key=key, img=img, style=style, size=size):  # type: ignore[no-untyped-def]
            return st.stylize(img, [style], max_size=size, style_keys=[key])

        t_miss, _ = _timed(miss, dev, args.repeat)
        hit()
        t_hit, _ = _timed(hit, dev, args.repeat)
        print(f"{size:>6} {t_enc:>9.3f} {t_tr:>10.3f} {t_dec:>9.3f} {total:>8.3f} "
              f"{size * size / 1e6 / total:>6.2f} {t_miss:>12.3f} {t_hit:>11.3f} "
              f"{t_miss / t_hit:>11.2f}x")


if __name__ == "__main__":
    main()
