"""Stylizing video segments and joining them: the work a worker and ``capvst stylize`` do.

This is the one module of :mod:`capvst.video` that runs the model (PyTorch). The flow, for
the queue and for the in-process command alike::

    open_video -> plan_segments -> stylize_segment (each, anywhere) -> join_video

``stylize_segment`` is idempotent: it writes its media create-only and a small JSON result
next to it last; a second delivery finds the result and returns it without work.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import images
from ..errors import BadVideo, CapvstError, InvalidItem, ModelError, TooSmall
from ..storage import join as join_uri
from ..storage import parse
from .encode import (
    OutputSpec,
    SegmentWriter,
    frame_name,
    join_segments,
    output_spec,
    video_encoder,
)
from .probe import DEFAULT_SEGMENT_SECONDS, Segment, VideoLimits, plan_segments
from .source import VideoSource, is_video_uri, open_video
from .warp import WarpMeter, WarpStats

if TYPE_CHECKING:
    from ..storage import Storage
    from ..stylize import StyleSource, Stylizer

Progress = Callable[[int], None]


class FrameStylizer:
    """Stylizes the frames of one video item: style statistics (or, with masks, the style's
    latent and label map) are computed once, in the constructor, and reused for every frame
    (statistics through the stylizer's cache, keyed by ``style_keys``; give it room for them).

    A frame's result equals :meth:`capvst.stylize.Stylizer.stylize` of the same decoded frame
    as an image, with the same options.
    """

    def __init__(self, stylizer: Stylizer, styles: Sequence[StyleSource], *,
                 weights: Sequence[float] | None = None, alpha_c: float = 0.0,
                 max_size: int = images.DEFAULT_MAX_SIZE,
                 style_keys: Sequence[str | None] | None = None,
                 style_mask: images.Source | None = None) -> None:
        from ..model import cwct

        if not styles:
            raise InvalidItem("at least one style is needed")
        try:
            self.alpha_c = cwct.check_alpha(alpha_c)
            self.weights = cwct.check_weights(len(styles), weights)
        except ValueError as exc:
            raise InvalidItem(str(exc)) from None
        self.stylizer = stylizer
        self.max_size = max_size
        self.styles = list(styles)
        # a key for every style, so that the stylizer's cache serves every frame after the first
        own = uuid.uuid4().hex
        self.keys: list[str | None] = [
            k if k is not None else f"{own}:{i}"
            for i, k in enumerate(style_keys if style_keys is not None else [None] * len(styles))]
        self._z_style: Any = None
        self._style_labels: np.ndarray | None = None
        if style_mask is not None:
            if len(styles) != 1:
                raise InvalidItem("masks work with exactly one style")
            s0 = styles[0]
            s_img = images.resize(s0() if callable(s0) else s0, max_size)
            self._style_labels = images.decode_mask(style_mask, s_img.size)
            self._z_style = stylizer.encode(s_img)
        else:
            for s, k in zip(self.styles, self.keys):
                stylizer.style_moments(s, max_size, k)  # computed now, cached for the frames

    @property
    def masked(self) -> bool:
        """Whether frames need a content mask (a style mask was given)."""
        return self._z_style is not None

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """Size of every stylized frame of a video of ``width``×``height``."""
        w, h = images.resized_size(width, height, self.max_size)
        if w < images.MIN_SIDE or h < images.MIN_SIDE:
            raise TooSmall(f"video is {width}x{height}, {w}x{h} after resizing; the network "
                           f"needs sides of at least {images.MIN_SIDE} pixels")
        return w, h

    def __call__(self, frame: Image.Image, content_mask: np.ndarray | Image.Image | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(resized input, stylized output) of one frame, both HWC uint8 RGB."""
        c_img = images.resize(frame, self.max_size)  # the only resize of this frame
        if not self.masked:
            out = self.stylizer.stylize(c_img, self.styles, weights=self.weights,
                                        alpha_c=self.alpha_c, max_size=self.max_size,
                                        style_keys=self.keys)
            return np.asarray(c_img), out
        if content_mask is None:
            raise InvalidItem("a style mask needs a content mask")
        labels = content_mask if isinstance(content_mask, np.ndarray) else \
            images.mask_labels(content_mask, c_img.size)
        return np.asarray(c_img), self._masked(c_img, labels)

    def _masked(self, c_img: Image.Image, labels: np.ndarray) -> np.ndarray:
        from ..model import cwct

        z_c = self.stylizer.encode(c_img)
        assert self._style_labels is not None
        try:
            z_cs = cwct.transfer_masked(z_c, self._z_style, labels, self._style_labels,
                                        self.alpha_c, self.stylizer.transform_dtype)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower() or "can't allocate" in str(exc).lower():
                raise ModelError("out of memory while transforming; use a smaller max_size"
                                 ) from None
            raise
        return self.stylizer.decode(z_cs)


class ContentMask:
    """The content mask of a video item: one image for every frame, or a mask per frame (a
    video or a frame folder with as many frames as the content)."""

    def __init__(self, image: bytes | None = None, frames: VideoSource | None = None) -> None:
        if (image is None) == (frames is None):
            raise InvalidItem("a content mask is one image or one per-frame source")
        self.image = image
        self.frames = frames
        self._labels: dict[tuple[int, int], np.ndarray] = {}

    def for_segment(self, segment: Segment, frames: int, size: tuple[int, int],
                    previous: bool) -> Iterator[np.ndarray]:
        """Label maps at ``size`` for the frames :meth:`VideoSource.segment_frames` yields."""
        if self.image is not None:
            if size not in self._labels:
                self._labels[size] = images.decode_mask(self.image, size)
            while True:
                yield self._labels[size]
        assert self.frames is not None
        info = self.frames.info
        if info.frames != frames:
            raise InvalidItem(f"the content mask has {info.frames} frames, the video {frames}")
        seg = Segment(segment.index, segment.start, segment.end, info.pts[segment.start],
                      info.pts[segment.end] if segment.end < info.frames else None,
                      info.pts[segment.start - 1] if segment.start > 0 else None)
        for f in self.frames.segment_frames(seg, previous=previous):
            yield images.mask_labels(f.image, size)


@dataclass(frozen=True)
class SegmentResult:
    """What one segment task did; stored as JSON next to the segment's media."""

    index: int
    start: int
    end: int
    frames: int
    width: int
    height: int
    warp_pairs: int
    warp_total: float
    uri: str
    encoder: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def warp(self) -> WarpStats:
        """The segment's share of the warping error."""
        return WarpStats(self.warp_pairs, self.warp_total)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentResult:
        """Inverse of :meth:`as_dict`."""
        return cls(**d)


def result_uri(segment_uri: str) -> str:
    """Where a segment's JSON result lives: next to its media."""
    return segment_uri + ".json"


def read_segment_result(store: Storage, segment_uri: str) -> SegmentResult | None:
    """The stored result of a finished segment, or None when it has not finished."""
    uri = result_uri(segment_uri)
    if not store.exists(uri):
        return None
    try:
        return SegmentResult.from_dict(json.loads(store.read(uri)))
    except (ValueError, TypeError) as exc:
        raise BadVideo(f"unreadable segment result {uri}: {exc}") from None


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now


def stylize_segment(source: VideoSource, segment: Segment, frames: FrameStylizer,
                    spec: OutputSpec, store: Storage, *, segment_uri: str,
                    output_uri: str | None = None, content_mask: ContentMask | None = None,
                    overwrite: bool = False, on_frame: Progress | None = None,
                    workdir: str | None = None) -> SegmentResult:
    """Stylize frames ``[segment.start, segment.end)`` and store them.

    Video formats: the frames are encoded into one MP4 at ``segment_uri`` (source pts, final
    codec), for :func:`join_video`. ``frames``: each frame is written as PNG under
    ``output_uri`` (``frame_000001.png``, numbered over the whole video). Either way the
    JSON result is written last, at ``segment_uri + ".json"``; when it already exists the
    segment is not run again. Writes are create-only unless ``overwrite``.

    Frame ``start - 1`` is decoded and stylized too (not stored), so the warping error of the
    pair across the cut is this segment's: segments' figures add up to the video's.
    """
    if not overwrite:
        done = read_segment_result(store, segment_uri)
        if done is not None:
            if on_frame is not None:
                on_frame(done.frames)
            return done
    if spec.format == "frames" and output_uri is None:
        raise InvalidItem("a frames output needs output_uri")
    encoder = video_encoder(spec)
    info = source.info
    if frames.masked and content_mask is None:
        raise InvalidItem("a style mask needs a content mask")
    size = frames.frame_size(info.width, info.height)
    timer = _Timer()
    meter = WarpMeter()
    writer: SegmentWriter | None = None
    tmp_path = None
    if spec.format != "frames":
        fd, tmp_path = tempfile.mkstemp(prefix=".capvst-seg-", suffix=".mp4", dir=workdir)
        os.close(fd)
        writer = SegmentWriter(tmp_path, spec, size[0], size[1], info.fps, info.time_base)
    written = 0
    try:
        masks = (content_mask.for_segment(segment, info.frames, size, previous=True)
                 if content_mask is not None and frames.masked else None)
        t = time.perf_counter()
        for frame in source.segment_frames(segment, previous=True):
            labels = next(masks) if masks is not None else None
            t = timer.add("decode", t)
            inp, out = frames(frame.image, labels)
            if out.shape[1::-1] != size:
                raise BadVideo(f"frame {frame.index} is {frame.image.width}x"
                               f"{frame.image.height}; the video's frames are "
                               f"{info.width}x{info.height}")
            t = timer.add("model", t)
            meter.push(inp, out)
            t = timer.add("warp", t)
            if frame.index < segment.start:
                continue  # the frame before the cut: only for the warping error
            if writer is not None:
                writer.write(out, frame.pts, frame.duration)
            else:
                assert output_uri is not None
                store.write(join_uri(output_uri, frame_name(frame.index)),
                            images.encode(out, "png"), create_only=not overwrite,
                            content_type="image/png")
            written += 1
            t = timer.add("encode", t)
            if on_frame is not None:
                on_frame(1)
        if written != segment.frames:
            raise BadVideo(f"{source.name}: segment {segment.index} decoded {written} of "
                           f"{segment.frames} frames")
        if writer is not None:
            writer.close()
            writer = None
            assert tmp_path is not None
            with open(tmp_path, "rb") as fh:
                store.write(segment_uri, fh.read(), create_only=not overwrite,
                            content_type="video/mp4")
            timer.add("encode", t)
    finally:
        if writer is not None:
            writer.abort()
        if tmp_path is not None and os.path.exists(tmp_path):
            os.unlink(tmp_path)
    result = SegmentResult(index=segment.index, start=segment.start, end=segment.end,
                           frames=written, width=size[0], height=size[1],
                           warp_pairs=meter.stats.pairs, warp_total=meter.stats.total,
                           uri=segment_uri, encoder=encoder,
                           seconds={k: round(v, 4) for k, v in timer.seconds.items()})
    store.write(result_uri(segment_uri), json.dumps(result.as_dict()).encode(),
                create_only=not overwrite, content_type="application/json")
    return result


@dataclass(frozen=True)
class VideoResult:
    """One video item's outcome: the numbers of its report line."""

    output: str
    format: str
    frames: int
    segments: int
    width: int
    height: int
    fps: float
    duration: float
    audio: str | None
    warping_error: float | None
    seconds: dict[str, float]
    #: False when the output already existed (create-only): an earlier join finished it.
    written: bool = True

    def report_fields(self) -> dict[str, Any]:
        """The fields a report line adds for a video item."""
        return {"frames": self.frames, "segments": self.segments,
                "warping_error": self.warping_error, "video_seconds": self.seconds}


def join_video(source: VideoSource, results: Sequence[SegmentResult], spec: OutputSpec,
               store: Storage, output_uri: str, *, overwrite: bool = False,
               workdir: str | None = None,
               metadata: dict[str, str] | None = None) -> VideoResult:
    """Join finished segments, in order, into the output and sum their figures.

    Checks that the segments cover every frame once. Video formats: packet copy of the
    segments plus the source's audio into ``output_uri`` (create-only unless ``overwrite``;
    an output that already exists is kept and ``written`` is False; ``metadata`` tags the
    object). ``frames``: the PNGs are already in place; their count is checked.
    """
    info = source.info
    ordered = sorted(results, key=lambda r: r.start)
    expect = 0
    for r in ordered:
        if r.start != expect or r.frames != r.end - r.start:
            raise ModelError(f"segments do not cover the video: one starts at frame {r.start}, "
                             f"expected {expect}")
        expect = r.end
    if expect != info.frames:
        raise ModelError(f"segments cover {expect} of {info.frames} frames")
    t0 = time.perf_counter()
    audio = None
    written = True
    if spec.format == "frames":
        prefix = parse(output_uri).path.rstrip("/")
        names = {frame_name(i) for i in range(info.frames)}
        have = {parse(u).path[len(prefix):].lstrip("/") for u in store.iter_uris(output_uri)}
        missing = names - have
        if missing:
            raise ModelError(f"{len(missing)} frames are missing under {output_uri}, e.g. "
                             f"{sorted(missing)[0]}")
    else:
        with tempfile.TemporaryDirectory(prefix="capvst-join-", dir=workdir) as tmp:
            paths = []
            for n, r in enumerate(ordered):
                p = os.path.join(tmp, f"{n:06d}.mp4")
                with open(p, "wb") as fh:
                    fh.write(store.read(r.uri))
                paths.append(p)
            out_path = os.path.join(tmp, "out")
            container = source.open_container() if info.has_audio else None
            try:
                stats = join_segments(paths, out_path, spec, container)
            finally:
                if container is not None:
                    container.close()
            if stats.frames != info.frames:
                raise ModelError(f"the joined video has {stats.frames} frames, the source "
                                 f"{info.frames}")
            audio = stats.audio
            with open(out_path, "rb") as fh:
                ctype = "video/webm" if spec.format == "webm" else "video/mp4"
                written = store.write(output_uri, fh.read(), create_only=not overwrite,
                                      content_type=ctype, metadata=metadata)
    seconds: dict[str, float] = {}
    for r in ordered:
        for k, v in r.seconds.items():
            seconds[k] = round(seconds.get(k, 0.0) + v, 4)
    seconds["join"] = round(time.perf_counter() - t0, 4)
    warp = sum((r.warp for r in ordered), WarpStats())
    return VideoResult(output=output_uri, format=spec.format, frames=info.frames,
                       segments=len(ordered), width=ordered[0].width,
                       height=ordered[0].height,
                       fps=float(info.fps), duration=info.duration, audio=audio,
                       warping_error=warp.value, seconds=seconds, written=written)


def stylize_video(store: Storage, content_uri: str, output_uri: str, frames: FrameStylizer, *,
                  fmt: str | None = None, limits: VideoLimits | None = None,
                  segment_seconds: float = DEFAULT_SEGMENT_SECONDS, fps: float | None = None,
                  content_mask_uri: str | None = None, overwrite: bool = True,
                  on_start: Callable[[int], None] | None = None,
                  on_frame: Progress | None = None,
                  max_mask_bytes: int | None = None) -> VideoResult:
    """The whole pipeline in this process: probe, plan, every segment, join.

    Segments go to a temporary folder; the output is written once at the end.
    """
    spec = output_spec(output_uri, fmt)
    video_encoder(spec)  # a missing encoder fails before any work
    limits = limits or VideoLimits()
    with open_video(store, content_uri, limits, fps=fps) as source, \
            tempfile.TemporaryDirectory(prefix="capvst-video-") as tmp:
        frames.frame_size(source.info.width, source.info.height)
        segments = plan_segments(source.info, segment_seconds)
        if on_start is not None:
            on_start(source.info.frames)
        with open_content_mask(store, content_mask_uri, limits, fps, max_mask_bytes) as mask:
            results = [
                stylize_segment(source, seg, frames, spec, store,
                                segment_uri=os.path.join(tmp, f"segment_{seg.index:05d}.mp4"),
                                output_uri=output_uri, content_mask=mask, overwrite=overwrite,
                                on_frame=on_frame, workdir=tmp)
                for seg in segments]
        return join_video(source, results, spec, store, output_uri, overwrite=overwrite,
                          workdir=tmp)


@contextmanager
def open_content_mask(store: Storage, uri: str | None, limits: VideoLimits, fps: float | None,
                      max_bytes: int | None) -> Iterator[ContentMask | None]:
    """The :class:`ContentMask` of ``uri`` (None without one): an image for every frame, or
    a video or folder of masks, one per frame."""
    if uri is None:
        yield None
        return
    if not is_video_uri(store, uri):
        yield ContentMask(image=store.read(uri, max_bytes))
        return
    with ExitStack() as stack:
        try:
            src = stack.enter_context(open_video(store, uri, limits, fps=fps))
        except CapvstError as exc:
            if exc.code in ("bad_video", "bad_image"):
                raise InvalidItem(f"content mask {uri}: {exc.message}") from None
            raise
        yield ContentMask(frames=src)
