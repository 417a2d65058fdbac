"""Our model path against the original algorithm as the authors' code runs it, side by side.

    python bench/model.py [--sizes 512] [--contents 16] [--batches 4] [--precisions float32]
                          [--mode photorealistic] [--device cpu] [--json OUT]

The original, written here from what the authors' code does per pair: resize content and
style, encode both with the eager float32 network (NCHW, a new tensor per coupling; the style
again for every pair), cWCT in float64 (centre, covariance, Cholesky, ``inv`` of the content
factor, whiten, colour), the inverse network, one image at a time. Ours: ``Stylizer`` with
the style statistics cached, the folded transform (``CAPVST_TRANSFORM_DTYPE``, default
float64), channels-last activations where they are faster (CPUs, half precisions) and
contents of one size batched through the network (``--batches``), at each network precision
of ``--precisions`` (``+c``: also compiled with ``torch.compile``, ``--compile``).

Each path runs in its own subprocess (so its peak memory is its own), on the same decoded
images: N crops of the reference photos at the size (4:3, so one resized size and batches
form) and one reference style. Decoding and encoding files are outside the timing in both.
Prints images/s, the ratio, peak memory, the output difference against the original in
8-bit levels (the parity tolerance: <= 1 level, >= 99.9 % identical) and, per precision, the
network's round trip ``max |inverse(forward(x)) - x|``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
REF = Path(os.environ.get("CAPVST_REFERENCE_DIR") or REPO / "tests" / "data" / "reference")
WEIGHTS = {"photorealistic": "photorealistic-seed0", "artistic": "artistic-seed1"}


def _inputs(n: int, size: int):  # type: ignore[no-untyped-def]
    """``n`` 4:3 crops of the reference contents at ``size`` and the style at ``size``."""
    from PIL import Image, ImageOps

    from capvst import images

    srcs = [images.decode_image(p) for p in sorted((REF / "images" / "content").glob("*"))]
    w, h = size, size * 3 // 4 // 4 * 4
    out = []
    for k in range(n):
        src = srcs[k % len(srcs)]
        sw, sh = src.size
        cw = min(sw, sh * 4 // 3) * (10 - k % 3) // 10
        ch = cw * 3 // 4
        x0 = (sw - cw) * ((k * 37) % 11) // 10
        y0 = (sh - ch) * ((k * 53) % 7) // 6
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
        out.append(ImageOps.mirror(img) if k % 2 else img)
    style = images.decode_image(REF / "images" / "style" / "05.jpg")
    return out, style.resize((w, h), Image.Resampling.BICUBIC)


def _sync(device) -> None:  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _original_cwct(zc, zs):  # type: ignore[no-untyped-def]
    """The authors' cWCT for one pair, float64, as their code computes it."""
    import torch

    def centred_cov(f):  # type: ignore[no-untyped-def]
        mean = f.mean(-1)
        x = f - mean.unsqueeze(-1)
        return mean, x, (x @ x.T) / (f.shape[-1] - 1)

    def chol(cov):  # type: ignore[no-untyped-def]
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        eps = 2e-5
        while True:  # the original's loading (we stop; it does not)
            factor, info = torch.linalg.cholesky_ex(cov)
            if int(info) == 0 or eps > 200 * 2e-5:
                return factor
            cov = cov + eye * eps
            eps += 2e-5

    c = zc[0].reshape(zc.shape[1], -1).double()
    s = zs[0].reshape(zs.shape[1], -1).double()
    _mc, xc, cov_c = centred_cov(c)
    white = torch.linalg.inv(chol(cov_c)) @ xc
    ms, _xs, cov_s = centred_cov(s)
    out = chol(cov_s) @ white + ms.unsqueeze(-1)
    return out.float().reshape(zc.shape)


def _original_net(net):  # type: ignore[no-untyped-def]
    """Encode and decode as the authors' code does: NCHW activations, a new tensor for every
    coupling's sum or difference (the same convolution modules, so the same weights)."""
    import torch

    from capvst.model.revnet import squeeze2, unsqueeze2

    def pad(x, extra):  # type: ignore[no-untyped-def]
        return torch.cat((x, x.new_zeros(x.shape[0], extra, *x.shape[2:])), dim=1)

    def halves(x):  # type: ignore[no-untyped-def]
        n = x.shape[1] // 2
        return x[:, :n], x[:, n:]

    def step(block, x1, x2):  # type: ignore[no-untyped-def]
        fx2 = block.conv(x2)
        if block.stride == 2:
            x1, x2 = squeeze2(x1), squeeze2(x2)
        return x2, fx2 + x1

    def back(block, x2, y1):  # type: ignore[no-untyped-def]
        if block.stride == 2:
            x2 = unsqueeze2(x2)
        x1 = y1 - block.conv(x2)
        return (unsqueeze2(x1) if block.stride == 2 else x1), x2

    cr = net.channel_reduction

    def forward(x):  # type: ignore[no-untyped-def]
        pair = halves(pad(x, net.extra))
        for block in net.stack:
            pair = step(block, *pair)
        a, b = halves(torch.cat(pair, dim=1))
        pair = (pad(a, cr.extra), pad(b, cr.extra))
        for block in cr.block_list:
            pair = step(block, *pair)
        z = torch.cat(pair, dim=1)
        for _ in range(cr.sp_steps):
            z = unsqueeze2(z)
        return z

    def inverse(z):  # type: ignore[no-untyped-def]
        for _ in range(cr.sp_steps):
            z = squeeze2(z)
        pair = halves(z)
        for block in reversed(cr.block_list):
            pair = back(block, *pair)
        keep = pair[0].shape[1] - cr.extra
        pair = halves(torch.cat((pair[0][:, :keep], pair[1][:, :keep]), dim=1))
        for block in reversed(net.stack):
            pair = back(block, *pair)
        return torch.cat(pair, dim=1)[:, :net.config.in_channel]

    return forward, inverse


def _run_path(args: argparse.Namespace) -> None:
    """One path in this process: time it, save its outputs and numbers."""
    import torch

    from capvst import images, load_model
    from capvst.stylize import Stylizer, resolve_device, set_numerics
    from tests.refdata import write_weights

    weights = write_weights(Path(args.work) / "weights")[WEIGHTS[args.mode]]
    model = load_model(args.mode, str(weights), warn=False)
    device = resolve_device(args.device)
    contents, style = _inputs(args.contents, args.size)
    tdtype = torch.float64 if args.transform_dtype == "float64" else torch.float32
    result: dict = {"path": args.path}
    if args.path == "original":
        set_numerics(device, "float32")
        encode, decode = _original_net(model.net.to(device).eval())

        def one(c):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                xc = images.to_tensor(images.resize(c, args.size)).to(device)
                xs = images.to_tensor(images.resize(style, args.size)).to(device)
                zc, zs = encode(xc), encode(xs)
                return images.to_uint8(decode(_original_cwct(zc, zs)))

        one(contents[0])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        outs = [one(c) for c in contents]
        _sync(device)
        result["seconds"] = time.perf_counter() - t0
    else:
        st = Stylizer(model, device, tdtype, precision=args.precision, compile=args.compiled)
        key = "bench-style"
        st.stylize(contents[0], [style], max_size=args.size)  # warm-up, no cache
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        outs = []
        for i in range(0, len(contents), args.batch):
            outs += st.stylize_batch(contents[i:i + args.batch], [style], max_size=args.size,
                                     style_keys=[key])
        _sync(device)
        result["seconds"] = time.perf_counter() - t0
        x = images.to_tensor(contents[0]).to(device)
        result["round_trip"] = float((st.inverse(st.forward(x)) - x).abs().max())
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(Path(args.work) / f"{args.tag}.npy", np.stack(outs))
    (Path(args.work) / f"{args.tag}.json").write_text(json.dumps(result))


def _spawn(args: argparse.Namespace, work: str, tag: str, path: str, size: int, batch: int = 1,
           precision: str = "float32", compiled: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--work", work, "--tag", tag,
           *(["--compiled"] if compiled else []),
           "--size", str(size), "--batch", str(batch), "--precision", precision,
           "--contents", str(args.contents), "--mode", args.mode, "--device", args.device,
           "--transform-dtype", args.transform_dtype]
    subprocess.run(cmd, check=True)
    return dict(json.loads((Path(work) / f"{tag}.json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512", help="long edges, comma-separated")
    ap.add_argument("--contents", type=int, default=16)
    ap.add_argument("--batches", default="4", help="our batch sizes, comma-separated")
    ap.add_argument("--precisions", default="float32",
                    help="our network precisions: float32, tf32, bf16, fp16 (comma-separated)")
    ap.add_argument("--mode", default="photorealistic", choices=sorted(WEIGHTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--transform-dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--compile", action="store_true",
                    help="also run ours with torch.compile (CAPVST_COMPILE), batch 1 per "
                         "precision; the first, compiling call is the untimed warm-up")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.path = args.child
        _run_path(args)
        return

    import torch

    print(f"{platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {args.device}, mode {args.mode}, {args.contents} contents x 1 style, "
          f"transform {args.transform_dtype}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'size':>5} {'batch':>5} {'precision':>9} {'orig img/s':>10} {'ours img/s':>10} "
          f"{'ratio':>6} {'orig MB':>8} {'ours MB':>8} {'max lvl':>7} {'ident %':>8} "
          f"{'round trip':>10}")
    rows = []
    ok = True
    with tempfile.TemporaryDirectory() as work:
        for size in [int(s) for s in args.sizes.split(",")]:
            orig = _spawn(args, work, f"orig-{size}", "original", size)
            want = np.load(Path(work) / f"orig-{size}.npy").astype(np.int16)
            runs = [(b, p, False) for p in args.precisions.split(",")
                    for b in [int(b) for b in args.batches.split(",")]]
            if args.compile:
                runs += [(1, p, True) for p in args.precisions.split(",")]
            for batch, precision, compiled in runs:
                tag = f"ours-{size}-{batch}-{precision}-{int(compiled)}"
                ours = _spawn(args, work, tag, "ours", size, batch, precision, compiled)
                got = np.load(Path(work) / f"{tag}.npy").astype(np.int16)
                diff = np.abs(got - want)
                ident = 100 * float((diff == 0).mean())
                ratio = orig["seconds"] / ours["seconds"]
                label = precision + ("+c" if compiled else "")
                row = {"size": size, "batch": batch, "precision": precision,
                       "compiled": compiled,
                       "original_img_s": args.contents / orig["seconds"],
                       "ours_img_s": args.contents / ours["seconds"], "ratio": ratio,
                       "original_peak_mb": orig["peak_mb"], "ours_peak_mb": ours["peak_mb"],
                       "max_level": int(diff.max()), "identical_pct": ident,
                       "round_trip": ours["round_trip"]}
                rows.append(row)
                if precision == "float32":
                    ok = ok and diff.max() <= 1 and ident >= 99.9
                print(f"{size:>5} {batch:>5} {label:>9} {row['original_img_s']:>10.3f} "
                      f"{row['ours_img_s']:>10.3f} {ratio:>5.2f}x {orig['peak_mb']:>8.0f} "
                      f"{ours['peak_mb']:>8.0f} {row['max_level']:>7} {ident:>8.3f} "
                      f"{ours['round_trip']:>10.2e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    f32 = [r for r in rows if r["precision"] == "float32" and not r["compiled"]]
    best = max((r["ratio"] for r in f32), default=float("nan"))
    print(f"verdict: ours is {best:.2f}x the original algorithm's throughput (best float32 row); "
          f"float32 outputs {'within' if ok else 'OUTSIDE'} the parity tolerance")


if __name__ == "__main__":
    main()
