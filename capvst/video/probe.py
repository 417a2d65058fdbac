"""What a video is (frames, timing, keyframes, audio) and how it splits into segments.

Importable without PyTorch: the scheduler probes and plans. Frame positions are indexes in
presentation order; ``pts`` values are in the video stream's ``time_base``. A frame folder
(or prefix) is a video whose frame ``i`` has pts ``i`` at ``1/fps``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ..errors import BadVideo, InvalidItem, TooLarge
from .media import av_errors, open_input

if TYPE_CHECKING:
    from ..settings import Settings

Kind = Literal["file", "frames"]
#: Default target length of a segment, in seconds (``CAPVST_VIDEO_SEGMENT_SECONDS``).
DEFAULT_SEGMENT_SECONDS = 10.0
#: Seconds a file's streams may end before the duration its header states (a longer gap
#: means a truncated file whose container has no frame count, as Matroska).
TRUNCATION_SLACK = 0.5
#: Frame rate of a frame folder when none is given (``CAPVST_VIDEO_FRAMES_FPS``).
DEFAULT_FRAMES_FPS = 25.0


@dataclass(frozen=True)
class VideoLimits:
    """Input limits; anything over them fails ``too_large``."""

    max_frames: int = 500_000
    max_seconds: float = 4 * 3600.0
    max_bytes: int = 20_000_000_000
    max_pixels: int = 100_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        """The limits a deployment configured."""
        return cls(settings.max_video_frames, settings.max_video_seconds,
                   settings.max_video_bytes, settings.max_pixels)


@dataclass(frozen=True)
class VideoInfo:
    """The facts of one video that planning, decoding and joining rely on."""

    kind: Kind
    frames: int
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    duration: float
    start_pts: int
    end_pts: int
    codec: str
    container: str
    rotation: int
    has_audio: bool
    audio_codec: str | None
    #: Frame indexes (presentation order) of the keyframes a decoder can start at.
    keyframes: tuple[int, ...]
    #: Presentation timestamps of every frame, sorted (not in :meth:`as_dict` by default).
    pts: tuple[int, ...] = field(repr=False)

    @property
    def keyframe_seconds(self) -> tuple[float, ...]:
        """Keyframe times in seconds from the first frame."""
        return tuple(float((self.pts[k] - self.start_pts) * self.time_base)
                     for k in self.keyframes)

    def as_dict(self, with_pts: bool = False) -> dict[str, Any]:
        """JSON-ready facts (fractions as ``"num/den"`` strings)."""
        d = asdict(self)
        d["fps"], d["time_base"] = str(self.fps), str(self.time_base)
        d["keyframes"] = list(self.keyframes)
        if with_pts:
            d["pts"] = list(self.pts)
        else:
            d.pop("pts")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoInfo:
        """Inverse of :meth:`as_dict` (``pts`` empty when it was left out)."""
        d = dict(d)
        d["fps"], d["time_base"] = Fraction(d["fps"]), Fraction(d["time_base"])
        d["keyframes"] = tuple(d["keyframes"])
        d["pts"] = tuple(d.get("pts", ()))
        return cls(**d)


@dataclass(frozen=True)
class Segment:
    """Frames ``[start, end)`` of a video: one unit of work, cut at a keyframe.

    ``pts_start``/``pts_end`` select the frames when decoding (``pts_end`` None: to the end);
    ``prev_pts`` is the pts of frame ``start - 1``, decoded too so that the warping error of
    the pair across the cut belongs to this segment (None for the first segment).
    """

    index: int
    start: int
    end: int
    pts_start: int
    pts_end: int | None
    prev_pts: int | None

    @property
    def frames(self) -> int:
        """Frames this segment outputs."""
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        """Inverse of :meth:`as_dict`."""
        return cls(**d)


def check_limits(info: VideoInfo, limits: VideoLimits) -> None:
    """TooLarge when the video is over a frame, duration or pixel limit."""
    _check(info.frames, info.duration, info.width, info.height, limits)


def _check(frames: int, seconds: float, width: int, height: int, limits: VideoLimits) -> None:
    if frames > limits.max_frames:
        raise TooLarge(f"video has {frames:,} frames, over the limit of {limits.max_frames:,} "
                       "(CAPVST_MAX_VIDEO_FRAMES)")
    if seconds > limits.max_seconds:
        raise TooLarge(f"video is {seconds:,.1f} s long, over the limit of "
                       f"{limits.max_seconds:,.0f} s (CAPVST_MAX_VIDEO_SECONDS)")
    if width * height > limits.max_pixels:
        raise TooLarge(f"video frames are {width}x{height}, over the pixel limit of "
                       f"{limits.max_pixels:,}")


def probe(source: str | BinaryIO, limits: VideoLimits | None = None, *,
          name: str = "video") -> VideoInfo:
    """Read a video file's facts: every frame's pts and keyframe flag by demuxing (no decode)
    and the first frame by decoding, so that a file that cannot play fails here.

    BadVideo for anything undecodable or truncated; TooLarge over ``limits`` (checked from the
    header first, so a huge file is refused before it is read).
    """
    limits = limits or VideoLimits()
    container = open_input(source, name=name)
    try:
        with av_errors(f"cannot read {name}"):
            return _probe(container, source, limits, name)
    finally:
        container.close()


def video_stream(container: Any) -> Any:
    """The main video stream (cover art and other attached pictures skipped)."""
    for s in container.streams.video:
        if not int(s.disposition) & 0x400:  # AV_DISPOSITION_ATTACHED_PIC
            return s
    raise BadVideo("the file has no video stream (only attached pictures)")


def _probe(container: Any, source: str | BinaryIO, limits: VideoLimits, name: str) -> VideoInfo:
    v = video_stream(container)
    tb = v.time_base
    if tb is None or tb <= 0:
        raise BadVideo(f"{name}: the video stream has no time base")
    rate = v.average_rate or v.guessed_rate or v.base_rate
    header_frames = int(v.frames or 0)
    header_seconds = float(container.duration / 1_000_000) if container.duration else 0.0
    width, height = int(v.codec_context.width), int(v.codec_context.height)
    if width <= 0 or height <= 0:
        raise BadVideo(f"{name}: the video stream has no frame size")
    _check(header_frames, header_seconds, width, height, limits)

    first = None
    for frame in container.decode(v):
        first = frame
        break
    if first is None:
        raise BadVideo(f"{name}: no frame could be decoded")
    rotation = int(getattr(first, "rotation", 0) or 0) % 360
    if rotation % 90:
        rotation = 0  # only quarter turns are applied; other angles are rare and ignored
    container.seek(0)

    packets: list[tuple[int, bool, int]] = []
    seen = 0
    last_end = Fraction(0)  # where the last packet of any stream ends, in seconds
    for packet in container.demux():
        if packet.size == 0:
            continue  # the flush packet at the end
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None and packet.time_base is not None:
            last_end = max(last_end, (ts + (packet.duration or 0)) * packet.time_base)
        if packet.stream_index != v.index:
            continue
        seen += 1
        if getattr(packet, "is_discard", False):
            continue  # before the start of an edit list: decoders drop it too
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            raise BadVideo(f"{name}: frames without timestamps are not supported")
        packets.append((int(ts), bool(packet.is_keyframe), int(packet.duration or 0)))
        if len(packets) > limits.max_frames:
            _check(len(packets), 0.0, width, height, limits)
    if not packets:
        raise BadVideo(f"{name}: no video frames")
    if header_frames and seen < header_frames:
        raise BadVideo(f"{name} is truncated: its index lists {header_frames} frames, "
                       f"only {seen} are present")
    start = Fraction(container.start_time or 0, 1_000_000)
    if header_seconds and float(last_end - start) < header_seconds - TRUNCATION_SLACK:
        raise BadVideo(f"{name} is truncated: its header says {header_seconds:.2f} s, the "
                       f"streams end at {float(last_end - start):.2f} s")
    packets.sort()
    pts = tuple(p[0] for p in packets)
    if len(set(pts)) != len(pts):
        raise BadVideo(f"{name}: two frames share a timestamp")
    keyframes = tuple(i for i, p in enumerate(packets) if p[1]) or (0,)
    if keyframes[0] != 0:
        keyframes = (0, *keyframes)  # decoding from the start always works
    if not rate:
        span = (pts[-1] - pts[0]) * tb
        rate = Fraction(len(pts) - 1) / span if len(pts) > 1 and span else Fraction(25)
    last = packets[-1][2] or max(1, round(1 / (Fraction(rate) * tb)))
    end_pts = pts[-1] + last
    duration = float((end_pts - pts[0]) * tb)
    if rotation in (90, 270):
        width, height = height, width
    audio = container.streams.audio[0] if container.streams.audio else None
    info = VideoInfo(
        kind="file", frames=len(pts), width=width, height=height, fps=Fraction(rate),
        time_base=Fraction(tb), duration=duration, start_pts=pts[0], end_pts=end_pts,
        codec=str(v.codec_context.name), container=str(container.format.name),
        rotation=rotation, has_audio=audio is not None,
        audio_codec=str(audio.codec_context.name) if audio is not None else None,
        keyframes=keyframes, pts=pts)
    check_limits(info, limits)
    return info


def frames_info(count: int, width: int, height: int, fps: float | Fraction = DEFAULT_FRAMES_FPS,
                limits: VideoLimits | None = None) -> VideoInfo:
    """Facts of a folder of ``count`` still frames of ``width``×``height`` played at ``fps``."""
    if count < 1:
        raise BadVideo("the frame folder holds no images")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise InvalidItem(f"frame rate must be positive, got {fps}")
    tb = 1 / rate
    info = VideoInfo(
        kind="frames", frames=count, width=width, height=height, fps=rate, time_base=tb,
        duration=float(count * tb), start_pts=0, end_pts=count, codec="image", container="frames",
        rotation=0, has_audio=False, audio_codec=None, keyframes=tuple(range(count)),
        pts=tuple(range(count)))
    check_limits(info, limits or VideoLimits())
    return info


def plan_segments(info: VideoInfo, seconds: float = DEFAULT_SEGMENT_SECONDS) -> list[Segment]:
    """Cut the video into segments of about ``seconds`` each, always at keyframes.

    Each cut is the keyframe (or the end of the video) nearest to ``seconds`` after the
    segment's start, so segments cover every frame exactly once, in order, and a short tail
    joins the segment before it rather than standing alone.
    """
    if seconds <= 0:
        raise InvalidItem(f"segment length must be positive, got {seconds}")
    if len(info.pts) != info.frames:
        raise InvalidItem("planning needs the frame timestamps (probe the video again)")
    target = Fraction(seconds) / info.time_base
    keys = [k for k in info.keyframes if k > 0]
    out: list[Segment] = []
    start, ki = 0, 0
    while start < info.frames:
        goal = info.pts[start] + target
        while ki < len(keys) and keys[ki] <= start:
            ki += 1
        end = info.frames
        best = abs(info.end_pts - goal)
        j = ki
        while j < len(keys):
            gap = abs(info.pts[keys[j]] - goal)
            if gap < best:
                best, end = gap, keys[j]
            elif info.pts[keys[j]] > goal:
                break
            j += 1
        out.append(Segment(index=len(out), start=start, end=end, pts_start=info.pts[start],
                           pts_end=info.pts[end] if end < info.frames else None,
                           prev_pts=info.pts[start - 1] if start > 0 else None))
        start = end
    return out
