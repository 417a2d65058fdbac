"""``capvst stylize`` on a video: the branch of the command that handles video contents."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .video.encode import VIDEO_FORMATS

if TYPE_CHECKING:
    from .settings import Settings
    from .storage import Storage


class UsageError(Exception):
    """A bad combination of options for a video (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options that only videos use."""
    p.add_argument("--fps", type=float, default=None, metavar="R",
                   help="frame rate of a folder of frames given as CONTENT (default "
                        "CAPVST_VIDEO_FRAMES_FPS, else 25)")


def wants_video(args: argparse.Namespace, store: Storage) -> bool:
    """Whether the command was given a video (a file, or a folder or prefix of frames)."""
    from .video.source import is_video_uri

    return any(is_video_uri(store, c) for c in args.contents)


def _check(args: argparse.Namespace) -> None:
    if len(args.contents) != 1:
        raise UsageError("give one video at a time (videos and images do not mix)")
    if (args.content_mask is None) != (args.style_mask is None):
        raise UsageError("--content-mask and --style-mask go together")
    if args.content_mask and len(args.style) > 1:
        raise UsageError("masks work with exactly one --style")
    if args.style_weights is not None and len(args.style_weights) != len(args.style):
        raise UsageError(f"{len(args.style_weights)} --style-weights for {len(args.style)} "
                         "styles")
    if args.fps is not None and not 0 < args.fps <= 1000:
        raise UsageError("--fps must be between 0 and 1000")
    if args.format is not None and args.format not in VIDEO_FORMATS:
        raise UsageError(f"--format {args.format} is for images; a video's output is "
                         + ", ".join(VIDEO_FORMATS))


def cmd_stylize_video(args: argparse.Namespace, settings: Settings, store: Storage) -> int:
    """Stylize one video into OUT (a video file, or a folder of PNG frames)."""
    import torch

    from . import load_model, untrained_warning
    from .images import decode_image
    from .stylize import Stylizer
    from .video.encode import output_spec, video_encoder
    from .video.probe import VideoLimits
    from .video.run import FrameStylizer, stylize_video

    _check(args)
    out = args.output
    if args.format is None and (os.path.isdir(out) and not out.endswith(("/", os.sep))):
        out = out + "/"  # an existing folder: frames
    try:
        spec = output_spec(out, args.format)
    except Exception as exc:  # InvalidItem: a usage problem here
        raise UsageError(str(exc)) from None
    video_encoder(spec)
    checkpoint, pinned = settings.checkpoint_for(args.mode)
    checkpoint = args.checkpoint or checkpoint
    if not checkpoint:
        print(untrained_warning(args.mode), file=sys.stderr, flush=True)
    model = load_model(args.mode, checkpoint, expected_sha256=args.checkpoint_sha256 or pinned,
                       storage=store, warn=False)
    dtype = {"float64": torch.float64, "float32": torch.float32}[
        args.transform_dtype or settings.transform_dtype]
    stylizer = Stylizer(model, args.device or settings.device, dtype,
                        max(settings.style_cache_size, len(args.style)),
                        memory_budget=settings.memory_budget, precision=settings.precision)
    styles = [decode_image(store.read(s, settings.max_input_bytes), settings.max_pixels)
              for s in args.style]
    style_mask = store.read(args.style_mask, settings.max_input_bytes) if args.style_mask \
        else None
    frames = FrameStylizer(stylizer, styles, weights=args.style_weights, alpha_c=args.alpha_c,
                           max_size=args.max_size, style_keys=args.style,
                           style_mask=style_mask)
    content = args.contents[0]
    with _Progress(content) as progress:
        result = stylize_video(
            store, content, out, frames, fmt=spec.format if args.format else None,
            limits=VideoLimits.from_settings(settings),
            segment_seconds=settings.video_segment_seconds,
            fps=args.fps or settings.video_frames_fps, content_mask_uri=args.content_mask,
            on_start=progress.start, on_frame=progress.advance,
            max_mask_bytes=settings.max_input_bytes)
    warp = ("n/a" if result.warping_error is None else f"{result.warping_error:.5f}")
    print(f"wrote {out} ({result.frames} frames {result.width}x{result.height} at "
          f"{result.fps:g} fps, {result.segments} segment{'s' if result.segments != 1 else ''}, "
          f"warping error {warp})",
          file=sys.stderr, flush=True)
    return 0


class _Progress:
    """A bar over frames on a terminal; a plain line every 10 s (and at the end) otherwise."""

    def __init__(self, name: str, every: float = 10.0) -> None:
        self.name = name
        self.every = every
        self.bar_mode = sys.stderr.isatty() or os.environ.get("CAPVST_PROGRESS") == "bar"
        self.total = 0
        self.done = 0
        self._bar: Any = None
        self._task: Any = None
        self._t0 = self._last = time.monotonic()

    def __enter__(self) -> _Progress:
        if self.bar_mode:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("frames"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(file=sys.stderr))
            self._bar.__enter__()
            self._task = self._bar.add_task(os.path.basename(self.name.rstrip("/")), total=None)
        return self

    def start(self, total: int) -> None:
        """The number of frames is known."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, n: int) -> None:
        """``n`` more frames are done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.done == self.total:
            rate = self.done / max(now - self._t0, 1e-9)
            print(f"{self.name}: {self.done}/{self.total} frames ({rate:.1f} frames/s)",
                  file=sys.stderr, flush=True)
            self._last = now

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
