"""The ``capvst`` and ``capvst-submit`` commands (DESIGN.md §3).

Exit codes (also in every ``--help``): 0 success; 1 an input, model or job error (one line on
stderr); 2 usage, a bad setting or an unusable manifest; 3 a job that finished with failed
items; 4 a service (Redis broker or Sentinel, S3) unreachable or refusing the credentials.
Tracebacks are shown only with ``CAPVST_DEBUG=1``. Arguments are parsed before anything heavy
is imported, so usage errors are answered at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from . import __version__, cli_train, cli_video
from .cli_common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    add_encoder_arguments,
    parser_kwargs,
    service_failure,
)
from .cli_common import Fail as _Fail
from .cli_common import err as _err
from .cli_common import info as _info
from .cli_common import load_settings as _settings
from .cli_common import weights as _weights
from .errors import CapvstError
from .images import DEFAULT_MAX_SIZE, OUTPUT_FORMATS
from .types import MODES
from .video.encode import VIDEO_FORMATS


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 8:
        raise argparse.ArgumentTypeError("must be at least 8")
    return v


def _max_size(text: str) -> int:
    """``--max-size``: 0 (full resolution) or at least 8."""
    return 0 if text.strip() == "0" else _positive_int(text)


def _tile(text: str) -> str | int:
    """``--tile``: auto, off or a tile side of at least 64 pixels."""
    t = text.strip().lower()
    if t in ("auto", "off"):
        return t
    try:
        v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not auto, off or a number: {text!r}") from None
    if v < 64:
        raise argparse.ArgumentTypeError("a tile side must be at least 64 pixels")
    return v


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return v


# ---------------------------------------------------------------------------------------------
# capvst stylize
# ---------------------------------------------------------------------------------------------
def _add_stylize(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "stylize", help="stylize images or a video in this process (no queue)",
        **parser_kwargs(
            description="Stylize one content image into the file OUT, or several into the "
                        "folder OUT (named after each content's stem). A video (MP4, MOV, MKV, "
                        "WebM, AVI, or a folder of frames) becomes the video OUT (.mp4, .mov, "
                        ".mkv, .webm) or PNG frames in the folder OUT, with its frame rate, "
                        "timing and audio. Inputs are local paths, file:// or s3:// URIs. No "
                        "Redis or workers are involved."))
    p.add_argument("contents", nargs="+", metavar="CONTENT",
                   help="content image(s): a path, file:// or s3:// URI; or one video")
    p.add_argument("--style", action="append", required=True, metavar="S",
                   help="style image; repeat to mix several styles")
    p.add_argument("--style-weights", type=_weights, metavar="W1,W2",
                   help="mixing weights, one per --style (normalised to sum 1; default equal)")
    p.add_argument("--alpha-c", type=_unit_float, default=0.0, metavar="A",
                   help="blend the statistics towards the content's own, 0..1 (default 0)")
    p.add_argument("--content-mask", metavar="M", help="segmentation mask of the content (for "
                   "a video: one image for every frame, or a mask video or folder of masks)")
    p.add_argument("--style-mask", metavar="M", help="segmentation mask of the style")
    p.add_argument("--mode", choices=MODES, default="photorealistic",
                   help="network configuration (default photorealistic)")
    p.add_argument("--checkpoint", metavar="C",
                   help="checkpoint path or URI (default: CAPVST_CHECKPOINT_<MODE>; none: an "
                        "untrained network, with a warning)")
    p.add_argument("--checkpoint-sha256", metavar="HEX",
                   help="refuse the checkpoint unless its sha256 matches")
    p.add_argument("--max-size", type=_max_size, default=DEFAULT_MAX_SIZE, metavar="N",
                   help=f"long-edge limit before inference; 0 is full resolution (default "
                        f"{DEFAULT_MAX_SIZE})")
    p.add_argument("--tile", type=_tile, default="auto", metavar="auto|off|N",
                   help="exact tiled inference: auto runs an image whole when it fits "
                        "CAPVST_MEMORY_BUDGET and in tiles otherwise; off; or the tile side in "
                        "pixels (default auto). The output is the same either way")
    p.add_argument("--device", metavar="D", help="auto, cpu, cuda or cuda:N (default "
                   "CAPVST_DEVICE, else auto)")
    p.add_argument("--transform-dtype", choices=("float64", "float32"), default=None,
                   help="precision of the transform's large passes (default "
                        "CAPVST_TRANSFORM_DTYPE, else float64; float32 is a faster "
                        "approximation; factorisations are float64 either way)")
    p.add_argument("--format", choices=(*OUTPUT_FORMATS, *VIDEO_FORMATS), default=None,
                   help="output format when OUT is a folder (default png); for a video: mp4, "
                        "webm or frames (PNG frames in the folder OUT)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (one content) or folder (several contents); for a "
                        "video, a video file or a folder of PNG frames")
    add_encoder_arguments(p)
    cli_video.add_arguments(p)
    p.set_defaults(func=cmd_stylize)


def _targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(content, output path) pairs, decided before any work so that usage errors cost nothing."""
    from .images import format_for
    from .storage import parse

    out = args.output
    folder = len(args.contents) > 1 or out.endswith(("/", os.sep)) or os.path.isdir(out)
    if not folder:
        if args.format:
            raise _Fail("--format applies to folder outputs; name the file OUT.<format>",
                        EXIT_USAGE)
        try:
            format_for(out)
        except CapvstError as exc:
            raise _Fail(exc.message, EXIT_USAGE) from None
        return [(args.contents[0], out)]
    fmt = args.format or "png"
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for c in args.contents:
        stem = os.path.splitext(parse(c).name)[0] or "output"
        if stem in seen:
            raise _Fail(f"{c} and {seen[stem]} would both be written to {stem}.{fmt}",
                        EXIT_USAGE)
        seen[stem] = c
        pairs.append((c, os.path.join(out, f"{stem}.{fmt}")))
    return pairs


@contextmanager
def _tile_progress(name: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar of tiles done on a terminal (stderr); nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(f"{os.path.basename(name)}: tiles", total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def cmd_stylize(args: argparse.Namespace) -> int:
    """Run the whole pipeline in this process for each content."""
    import torch

    from . import load_model, untrained_warning
    from .images import decode_image, encode, format_for
    from .storage import Storage
    from .stylize import Stylizer

    video_store = Storage(_settings(), confine_local=False)
    if cli_video.wants_video(args, video_store):  # videos: capvst/cli_video.py
        try:
            return cli_video.cmd_stylize_video(args, _settings(), video_store)
        except cli_video.UsageError as exc:
            raise _Fail(str(exc), EXIT_USAGE) from None
    if args.format in VIDEO_FORMATS:
        raise _Fail(f"--format {args.format} is for videos", EXIT_USAGE)
    if (args.content_mask is None) != (args.style_mask is None):
        raise _Fail("--content-mask and --style-mask go together", EXIT_USAGE)
    if args.content_mask and len(args.contents) > 1:
        raise _Fail("masks apply to a single content image", EXIT_USAGE)
    if args.content_mask and len(args.style) > 1:
        raise _Fail("masks work with exactly one --style", EXIT_USAGE)
    if args.style_weights is not None and len(args.style_weights) != len(args.style):
        raise _Fail(f"{len(args.style_weights)} --style-weights for {len(args.style)} styles",
                    EXIT_USAGE)
    pairs = _targets(args)
    settings = _settings()
    store = Storage(settings, confine_local=False)
    checkpoint, pinned = settings.checkpoint_for(args.mode)
    checkpoint = args.checkpoint or checkpoint
    if not checkpoint:
        _info(untrained_warning(args.mode))
    try:
        model = load_model(args.mode, checkpoint, expected_sha256=args.checkpoint_sha256 or pinned,
                           storage=store, warn=False)
        dtype = {"float64": torch.float64, "float32": torch.float32}[
            args.transform_dtype or settings.transform_dtype]
        stylizer = Stylizer(model, args.device or settings.device, dtype,
                            settings.style_cache_size, settings.memory_budget,
                            settings.precision, compile=settings.compile)
    except CapvstError as exc:
        raise _Fail(exc.message) from None

    def read(uri: str) -> bytes:
        return store.read(uri, settings.max_input_bytes)

    try:
        styles = [decode_image(read(s), settings.max_pixels) for s in args.style]
        masks = (read(args.content_mask), read(args.style_mask)) if args.content_mask else None
    except CapvstError as exc:
        raise _Fail(exc.message) from None
    failures = 0
    for n, (content, target) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        try:
            with _tile_progress(content) as progress:
                pixels = stylizer.stylize(
                    decode_image(read(content), settings.max_pixels), styles,
                    weights=args.style_weights, alpha_c=args.alpha_c, max_size=args.max_size,
                    content_mask=masks[0] if masks else None,
                    style_mask=masks[1] if masks else None, style_keys=args.style,
                    tile=args.tile, progress=progress)
            fmt = format_for(target)
            store.write(target, encode(pixels, fmt, png_level=args.png_level,
                                       jpeg_quality=args.jpeg_quality,
                                       webp_quality=args.webp_quality),
                        content_type="image/jpeg" if fmt == "jpg" else f"image/{fmt}")
        except CapvstError as exc:
            failures += 1
            _err(f"{content}: {exc.message}")
            continue
        if len(pairs) > 1:
            _info(f"[{n}/{len(pairs)}] {content} -> {target} ({time.perf_counter() - t0:.1f} s)")
    if failures:
        if len(pairs) > 1:
            _info(f"{failures} of {len(pairs)} images failed")
        return EXIT_ERROR
    if len(pairs) == 1:
        _info(f"wrote {pairs[0][1]}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="capvst", **parser_kwargs(
        description="Batch style transfer with CAP-VSTNet: stylize images locally, or run and "
                    "manage queued jobs (Redis, a scheduler and GPU workers). `capvst COMMAND "
                    "--help` describes each command."))
    p.add_argument("--version", action="version", version=f"capvst {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_stylize(sub)
    from . import cli_jobs

    cli_jobs.add_commands(sub)
    cli_train.add_command(sub)
    return p


def _settings_or_none():  # type: ignore[no-untyped-def]
    try:
        return _settings()
    except _Fail:
        return None


def _run(argv: Sequence[str] | None, build: Callable[[], argparse.ArgumentParser]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    debug = os.environ.get("CAPVST_DEBUG") == "1"
    try:
        args = build().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as exc:  # one line; CAPVST_DEBUG=1 shows the traceback
        unreachable = service_failure(exc, _settings_or_none())
        if unreachable is not None:
            if debug:
                raise
            _err(str(unreachable))
            return unreachable.code
        if isinstance(exc, _Fail):
            _err(str(exc))
            return exc.code
        if debug:
            raise
        if isinstance(exc, CapvstError):
            _err(exc.message)
            return EXIT_ERROR
        _err(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``capvst``."""
    sys.exit(_run(argv, _parser))


def submit_main(argv: Sequence[str] | None = None) -> NoReturn:
    """``capvst-submit`` (the same as ``capvst submit``)."""
    from . import cli_jobs

    sys.exit(_run(argv, cli_jobs.submit_parser))
