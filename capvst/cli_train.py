"""``capvst train``: train CAP-VSTNet with the authors' recipe (docs/TRAINING.md).

Options are checked before PyTorch is imported, so a usage error costs nothing. Exit codes:
0 done; 1 a data, model or checkpoint error (one line on stderr); 2 usage; 130 interrupted
(the checkpoint then holds the last step, and ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .cli_common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, parser_kwargs
from .types import MODES


def _int(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return v

    return parse


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return v


def _device(text: str) -> str:
    v = text.strip().lower()
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise argparse.ArgumentTypeError("must be auto, cpu, cuda or cuda:N")


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``capvst train``."""
    p = sub.add_parser(
        "train", help="train a photorealistic or artistic network on your own images",
        **parser_kwargs(
            description="Train CAP-VSTNet with the authors' recipe: style loss on VGG-19 "
                        "features, cycle reconstruction, Matting Laplacian loss, and a video "
                        "fine-tuning stage with a temporal loss on synthetic flow. Writes "
                        "OUT/checkpoint.pt (usable by 'capvst stylize --checkpoint' and "
                        "workers), OUT/log.jsonl, OUT/summary.json and sample grids in "
                        "OUT/samples. See docs/TRAINING.md.",
            epilog="130: interrupted (the checkpoint holds the last finished step; "
                   "--resume continues)."))
    p.add_argument("--mode", choices=MODES, required=True,
                   help="network configuration to train")
    p.add_argument("--content", required=True, metavar="DIR_OR_URI",
                   help="folder or s3:// prefix of content images, searched recursively "
                        "(the paper: MS-COCO)")
    p.add_argument("--style", required=True, metavar="DIR_OR_URI",
                   help="folder or s3:// prefix of style images, searched recursively (the "
                        "paper: MS-COCO for photorealistic, WikiArt for artistic); may be the "
                        "same as --content")
    p.add_argument("--vgg", required=True, metavar="PATH",
                   help="vgg_normalised.pth: the VGG-19 state dict of the AdaIN / CAP-VSTNet "
                        "training code")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (checkpoint.pt, log.jsonl, summary.json, samples/)")
    p.add_argument("--steps", type=_int(1), default=170_000, metavar="N",
                   help="total steps, the video stage included (default 170000: 160000 image "
                        "+ 10000 video, the authors')")
    p.add_argument("--fine-tune-steps", type=_int(0), default=10_000, metavar="N",
                   help="the last N of --steps are the video stage with the temporal loss "
                        "(default 10000; 0: image model only)")
    p.add_argument("--batch-size", type=_int(1), default=2, metavar="B",
                   help="content/style pairs per step (default 2)")
    p.add_argument("--new-size", type=_int(8), default=512, metavar="N",
                   help="images are resized so that their shorter side is N (default 512)")
    p.add_argument("--crop", type=_int(8), default=256, metavar="N",
                   help="then a random NxN crop is taken; a multiple of 4 (default 256)")
    p.add_argument("--lr", type=_nonneg, default=1e-4, metavar="LR",
                   help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-decay", type=_nonneg, default=5e-5, metavar="D",
                   help="the learning rate at step s is LR / (1 + D*s) (default 5e-5)")
    p.add_argument("--style-weight", type=_nonneg, default=1.0, metavar="W",
                   help="weight of the style loss (default 1)")
    p.add_argument("--content-weight", type=_nonneg, default=0.0, metavar="W",
                   help="weight of the VGG relu4_1 content loss (default 0, off)")
    p.add_argument("--lap-weight", type=_nonneg, default=None, metavar="W",
                   help="weight of the Matting Laplacian loss (default 1500 photorealistic, "
                        "1 artistic; 0 turns it off)")
    p.add_argument("--rec-weight", type=_nonneg, default=None, metavar="W",
                   help="weight of the cycle reconstruction loss (default 10 photorealistic, "
                        "1 artistic)")
    p.add_argument("--temporal-weight", type=_nonneg, default=60.0, metavar="W",
                   help="weight of the temporal loss in the video stage (default 60)")
    p.add_argument("--win-rad", type=_int(1), default=1, metavar="R",
                   help="window radius of the Matting Laplacian; larger costs (2R+1)^2 more "
                        "CPU and memory (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT/checkpoint.pt (weights, optimizer, step)")
    p.add_argument("--device", type=_device, default=None, metavar="D",
                   help="auto, cpu, cuda or cuda:N (default CAPVST_DEVICE, else auto)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of initialisation, sampling, crops and synthetic flow "
                        "(default 0)")
    p.set_defaults(func=cmd_train)


def _err(msg: str) -> None:
    print(f"capvst: error: {msg}", file=sys.stderr, flush=True)


def _is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def _precheck(args: argparse.Namespace) -> str | None:
    """Problems that need no PyTorch: the options together, local paths, the output folder."""
    from .training.config import TrainConfig, TrainingError

    try:
        cfg = TrainConfig(
            mode=args.mode, content=args.content, style=args.style, vgg=args.vgg,
            out=args.out, steps=args.steps, fine_tune_steps=args.fine_tune_steps,
            batch_size=args.batch_size, new_size=args.new_size, crop=args.crop, lr=args.lr,
            lr_decay=args.lr_decay, style_weight=args.style_weight,
            content_weight=args.content_weight, lap_weight=args.lap_weight,
            rec_weight=args.rec_weight, temporal_weight=args.temporal_weight,
            win_rad=args.win_rad, resume=args.resume, device=args.device or "auto",
            seed=args.seed)
        cfg.check()
    except TrainingError as exc:
        return exc.message
    for opt, value in (("--content", args.content), ("--style", args.style)):
        local = value.removeprefix("file://")
        if not _is_remote(value) and not os.path.isdir(local):
            return f"{opt} {value}: no such folder"
    if not os.path.isfile(args.vgg):
        return f"--vgg {args.vgg}: no such file"
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if args.resume and not os.path.isfile(ckpt):
        return f"--resume: no checkpoint at {ckpt}"
    if not args.resume and os.path.exists(ckpt):
        return f"{ckpt} exists; pass --resume to continue that run or choose another --out"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out} is not a folder"
    args.config = cfg
    return None


def cmd_train(args: argparse.Namespace) -> int:
    """Check the options, then train."""
    problem = _precheck(args)
    if problem:
        _err(problem)
        return EXIT_USAGE
    from pydantic import ValidationError

    from .errors import CapvstError
    from .settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        _err(f"bad setting CAPVST_{where.upper()}: {first.get('msg')}")
        return EXIT_USAGE
    cfg = args.config
    if args.device is None:
        cfg.device = settings.device

    from .training.trainer import train

    tty = sys.stderr.isatty() or os.environ.get("CAPVST_PROGRESS") == "bar"
    try:
        summary = train(cfg, settings, progress="bar" if tty else "lines")
    except CapvstError as exc:
        _err(exc.message)
        return EXIT_ERROR
    env = f"CAPVST_CHECKPOINT_{cfg.mode.upper()}"
    rate = summary["steps_per_second"]
    lines = [
        f"done: step {summary['step']} of {cfg.steps}, {summary['steps_run']} steps in "
        f"{summary['seconds']:.1f} s" + (f" ({rate:.3g} steps/s)" if rate else ""),
        f"skipped batches: {summary['skipped_cholesky']} (Cholesky failure), "
        f"{summary['skipped_nonfinite']} (non-finite); unreadable files: "
        f"{len(summary['unreadable_files'])}",
        f"checkpoint: {summary['checkpoint']} (model {summary['model_id']})",
        f"use it: {env}={summary['checkpoint']} {env}_SHA256={summary['sha256']}",
    ]
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return EXIT_OK
