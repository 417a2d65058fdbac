"""Output encoding and input decoding costs: PNG zlib levels, and whether a large JPEG may be
decoded at reduced scale (Pillow's ``draft``) when it is resized anyway.

    python bench/codecs.py [--png-size 1280x960] [--max-sizes 512,1280] [--sides 2560,4000,6000]

PNG: encode time and file size of a 1280×960 photo-like output at each zlib level (the pixels
are the same at every level; capvst's default is ``images.DEFAULT_PNG_LEVEL``).

JPEG draft: the original decodes the whole JPEG and resizes it bicubically
(``images.resize``). Pillow's ``draft`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 in the
DCT domain instead, which is much faster for a big photo, but the pixels that reach the
network are then not the original's. This measures, for each source size and
``max_size``, decode + resize time both ways and the difference of the resized pixels in 8-bit
levels. The parity tolerance (at most 1 level, at least 99.9 % identical) decides: capvst
would use ``draft`` only if every row were within it.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REF = REPO / "tests" / "data" / "reference" / "images" / "content"

from capvst import images  # noqa: E402


def _source(side: int, quality: int) -> bytes:
    """A 4:3 JPEG of ``side`` pixels wide made from a reference photo."""
    img = Image.open(REF / "01.jpg").convert("RGB")
    img = img.resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _timed(fn, repeat: int = 3):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def png_levels(size: str) -> None:
    w, h = (int(v) for v in size.split("x"))
    img = Image.open(REF / "01.jpg").convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    px = np.asarray(img)
    print(f"PNG of a {w}x{h} photo: {'level':>5} {'encode s':>8} {'bytes':>10} {'vs 6':>6}")
    rows = {}
    for level in (0, 1, 3, 6, 9):
        t, data = _timed(lambda level=level: images.encode(px, "png", png_level=level))
        rows[level] = (t, len(data))
    for level, (t, n) in rows.items():
        mark = " (default)" if level == images.DEFAULT_PNG_LEVEL else ""
        print(f"{'':>28}{level:>5} {t:8.3f} {n:>10,} {n / rows[6][1]:6.2f}{mark}")
    t1, t6 = rows[images.DEFAULT_PNG_LEVEL][0], rows[6][0]
    print(f"verdict: the default level encodes {t6 / t1:.1f}x faster than Pillow's 6, "
          f"{100 * (rows[images.DEFAULT_PNG_LEVEL][1] / rows[6][1] - 1):+.1f} % size")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png-size", default="1280x960")
    ap.add_argument("--max-sizes", default="512,1280")
    ap.add_argument("--sides", default="2560,4000,6000")
    ap.add_argument("--quality", type=int, default=92)
    args = ap.parse_args()
    png_levels(args.png_size)
    print()
    print("JPEG decoded in full then resized (the original) against draft-decoded then resized:")
    print(f"{'source':>11} {'max_size':>8} {'full s':>7} {'draft s':>7} {'max lvl':>7} "
          f"{'ident %':>8}")
    ok = True
    for side in [int(s) for s in args.sides.split(",")]:
        data = _source(side, args.quality)
        for max_size in [int(m) for m in args.max_sizes.split(",")]:
            def full(data: bytes = data, max_size: int = max_size) -> Image.Image:
                return images.resize(images.decode_image(data), max_size)

            def draft(data: bytes = data, max_size: int = max_size) -> Image.Image:
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                scale = max_size / max(w, h)
                img.draft("RGB", (int(w * scale), int(h * scale)))
                return images.resize(img.convert("RGB"), max_size)

            t_full, a = _timed(full)
            t_draft, b = _timed(draft)
            if a.size != b.size:
                print(f"{side}x{side * 3 // 4:<5} {max_size:>8}  sizes differ: {a.size} {b.size}")
                ok = False
                continue
            d = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
            ident = 100 * float((d == 0).mean())
            ok = ok and int(d.max()) <= 1 and ident >= 99.9
            print(f"{side}x{side * 3 // 4:<5} {max_size:>8} {t_full:7.3f} {t_draft:7.3f} "
                  f"{int(d.max()):>7} {ident:8.3f}", flush=True)
    print("verdict: draft decoding is " + ("within" if ok else "OUTSIDE")
          + " the parity tolerance" + ("" if ok else "; capvst decodes JPEGs in full"))


if __name__ == "__main__":
    main()
