"""Build time of the Matting Laplacian used in training, against pymatting's numba version.

    python bench/laplacian_speed.py [--sizes 128,256,512] [--win-rad 1] [--repeat 5]

Both build the same closed-form Laplacian (tests/training/test_laplacian.py checks they agree
to 1e-6); pymatting's first call compiles with numba and is run once before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from capvst.training import matting_laplacian


def _median(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="128,256,512")
    ap.add_argument("--win-rad", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    try:
        from pymatting import cf_laplacian
    except ImportError:
        cf_laplacian = None
    rng = np.random.default_rng(0)
    print("| side | capvst (s) | nnz | pymatting (s) | pymatting / capvst |")
    print("|---|---|---|---|---|")
    for side in (int(s) for s in args.sizes.split(",")):
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mine = _median(lambda img=img: matting_laplacian(img, win_rad=args.win_rad), args.repeat)
        nnz = matting_laplacian(img, win_rad=args.win_rad).nnz
        if cf_laplacian is None:
            print(f"| {side} | {mine:.3f} | {nnz:,} | (not installed) | |")
            continue
        x = img / 255.0
        cf_laplacian(x, radius=args.win_rad)  # numba compiles here
        theirs = _median(lambda x=x: cf_laplacian(x, radius=args.win_rad), args.repeat)
        print(f"| {side} | {mine:.3f} | {nnz:,} | {theirs:.3f} | {theirs / mine:.2f} |")


if __name__ == "__main__":
    main()
