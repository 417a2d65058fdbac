"""Parity of every reference case on a device: ``Stylizer`` (as the workers run it) against
the original code's outputs in tests/data/reference, at a network precision.

    python bench/parity.py [--device cuda] [--precision float32] [--transform-dtype float64]
                           [--max-case-size N]

Prints each case's largest difference in 8-bit levels and the share of identical values;
the tolerance is <= 1 level and >= 99.9 % identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    import torch
    from PIL import Image

    from capvst import images, load_model
    from capvst.stylize import Stylizer
    from tests.refdata import REFERENCE, reference_tree

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--transform-dtype", default=os.environ.get("CAPVST_TRANSFORM_DTYPE",
                                                                "float64"))
    ap.add_argument("--max-case-size", type=int, default=0,
                    help="skip cases whose max_size is above this (0: run every case)")
    args = ap.parse_args()
    dtype = torch.float64 if args.transform_dtype == "float64" else torch.float32
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_tree(Path(tmp))
        stylizers: dict[str, Stylizer] = {}
        print(f"{'case':<38} {'max level':>9} {'identical %':>11}")
        for case in json.loads((REFERENCE / "cases.json").read_text())["cases"]:
            if args.max_case_size and case["max_size"] > args.max_case_size:
                continue
            st = stylizers.get(case["weights"])
            if st is None:
                model = load_model(case["mode"], str(ref / "weights" / f"{case['weights']}.pt"),
                                   warn=False)
                st = stylizers[case["weights"]] = Stylizer(model, args.device, dtype,
                                                           precision=args.precision)
            content = images.decode_image(ref / "images" / case["content"])
            styles = [images.decode_image(ref / "images" / s) for s in case["style"]]
            masks = {}
            if "content_mask" in case:
                masks = {"content_mask": (ref / case["content_mask"]).read_bytes(),
                         "style_mask": (ref / case["style_mask"]).read_bytes()}
            got = st.stylize(content, styles, weights=case.get("style_weights"),
                             alpha_c=case.get("alpha_c", 0.0), max_size=case["max_size"],
                             **masks).astype(np.int16)
            want = np.asarray(Image.open(ref / case["expected_png"]).convert("RGB"), np.int16)
            diff = np.abs(got - want)
            ident = 100 * float((diff == 0).mean())
            ok = ok and int(diff.max()) <= 1 and ident >= 99.9
            print(f"{case['name']:<38} {int(diff.max()):>9} {ident:>11.3f}", flush=True)
    print(f"verdict: {'every case within' if ok else 'OUTSIDE'} the parity tolerance on "
          f"{next(iter(stylizers.values())).device} at {args.precision} "
          f"(transform {args.transform_dtype})")


if __name__ == "__main__":
    main()
