"""Encoding segments and joining them into the final video, with the source's audio.

Segments are encoded once, in the final codec (H.264, or VP9 for WebM), into MP4 files that
keep the source's time base and every frame's pts. Each segment starts with a keyframe and has
no B-frames, so decode order equals presentation order and the join is a plain packet copy:
no frame is re-encoded, none is lost or duplicated, and the timing is the source's. (A lossless
intermediate would need a full re-encode at the join: a serial pass over the whole video on one
machine, with intermediates ten times larger.) MP4 rather than Matroska for the segments
because Matroska rounds timestamps to milliseconds.

The source's audio is copied packet for packet when the output container can hold its codec;
otherwise (say AAC into WebM, PCM into MP4) it is transcoded to Opus or AAC.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidItem, ModelError
from .media import av_errors, require

if TYPE_CHECKING:
    import numpy as np

VideoFormat = Literal["mp4", "webm", "frames"]
#: Values of a manifest's ``format`` for a video item.
VIDEO_FORMATS: tuple[VideoFormat, ...] = ("mp4", "webm", "frames")
#: Encoders tried in order for each codec; the first one the PyAV build has is used.
H264_ENCODERS = ("libx264", "libopenh264")
VP9_ENCODERS = ("libvpx-vp9", "libvpx")
#: Quality settings: x264 CRF 18 is close to visually lossless at a moderate size.
ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "18", "preset": "medium", "bf": "0"},
    "libopenh264": {"b": "8M", "bf": "0"},
    "libvpx-vp9": {"crf": "24", "b": "0", "row-mt": "1", "cpu-used": "4", "deadline": "good"},
    "libvpx": {"crf": "8", "b": "4M", "cpu-used": "4", "deadline": "good"},
}
#: Container of the segment files.
SEGMENT_EXTENSION = ".mp4"
#: File name of frame ``index`` (0-based) in a ``frames`` output.
FRAME_NAME = "frame_{:06d}.png"

_EXTENSIONS: dict[str, tuple[VideoFormat, str]] = {
    ".mp4": ("mp4", "mp4"), ".m4v": ("mp4", "mp4"), ".mov": ("mp4", "mov"),
    ".mkv": ("mp4", "matroska"), ".webm": ("webm", "webm"),
}
# audio codecs each container takes as they are
_AUDIO_COPY = {
    "mp4": {"aac", "mp3", "opus", "flac", "alac", "ac3", "eac3"},
    "mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be", "pcm_s24le",
            "pcm_s24be", "pcm_s32le", "pcm_f32le", "pcm_u8"},
    "webm": {"opus", "vorbis"},
}


def frame_name(index: int) -> str:
    """``frame_000001.png`` for frame 0: numbered from 1, six digits or more."""
    return FRAME_NAME.format(index + 1)


@dataclass(frozen=True)
class OutputSpec:
    """How a video output is written: format, muxer (None for frames) and encoder."""

    format: VideoFormat
    container: str | None

    @property
    def codec(self) -> str:
        """``h264``, ``vp9`` or ``png``."""
        return {"mp4": "h264", "webm": "vp9", "frames": "png"}[self.format]


def output_spec(uri: str, fmt: str | None = None) -> OutputSpec:
    """The output a URI and an optional ``format`` ask for.

    ``format`` wins (``mp4`` keeps a ``.mov``/``.mkv`` extension's container); without it the
    extension decides, and a folder or prefix (trailing ``/``, no extension) means frames.
    """
    ext = os.path.splitext(uri.rstrip("/"))[1].lower()
    if uri.endswith("/"):
        ext = ""
    if fmt is not None:
        if fmt not in VIDEO_FORMATS:
            raise InvalidItem(f"unsupported video format {fmt!r}; use one of "
                              + ", ".join(VIDEO_FORMATS))
        if fmt == "frames":
            return OutputSpec("frames", None)
        if fmt == "webm":
            return OutputSpec("webm", "webm")
        return OutputSpec("mp4", _EXTENSIONS[ext][1] if ext in _EXTENSIONS and ext != ".webm"
                          else "mp4")
    if not ext:
        return OutputSpec("frames", None)
    if ext not in _EXTENSIONS:
        raise InvalidItem(f"unsupported video output .{ext.lstrip('.')}; use .mp4, .mov, .mkv, "
                          ".webm or a folder for PNG frames")
    f, container = _EXTENSIONS[ext]
    return OutputSpec(f, container)


def _has_encoder(name: str) -> bool:
    require("av")
    from av.codec.codec import Codec

    try:
        Codec(name, "w")
    except Exception:  # UnknownCodecError and friends: not in this build
        return False
    return True


def available_encoders() -> dict[str, str | None]:
    """The encoder this PyAV build would use per codec (``h264``, ``vp9``), or None."""
    return {"h264": next((n for n in H264_ENCODERS if _has_encoder(n)), None),
            "vp9": next((n for n in VP9_ENCODERS if _has_encoder(n)), None)}


def video_encoder(spec: OutputSpec) -> str:
    """The encoder for ``spec``; ModelError naming the alternatives when the build has none."""
    if spec.format == "frames":
        return "png"
    name = available_encoders()[spec.codec]
    if name is None:
        tried = H264_ENCODERS if spec.codec == "h264" else VP9_ENCODERS
        other = "webm or frames" if spec.codec == "h264" else "mp4 or frames"
        raise ModelError(f"this PyAV build has no {spec.codec.upper()} encoder (tried "
                         f"{', '.join(tried)}); install a PyAV wheel from PyPI (it has libx264 "
                         f"and libvpx) or choose format {other}")
    return name


def _tag_bt601(cc: Any) -> None:
    """Say in the stream which matrix the RGB→YUV conversion used (swscale's default,
    BT.601 limited range), so players convert back with the same one."""
    for attr, value in (("colorspace", 6), ("color_primaries", 6), ("color_trc", 6),
                        ("color_range", 1)):
        try:
            setattr(cc, attr, value)
        except (AttributeError, TypeError, ValueError):
            pass


class SegmentWriter:
    """Encodes the frames of one segment into an MP4 file with the source's timestamps."""

    def __init__(self, path: str, spec: OutputSpec, width: int, height: int, fps: Fraction,
                 time_base: Fraction) -> None:
        import av

        self.path = path
        self.encoder = video_encoder(spec)
        self.frames = 0
        self._last_pts: int | None = None
        with av_errors("cannot start the video encoder", ModelError):
            self._out: Any = av.open(path, mode="w", format="mp4")
            stream: Any = self._out.add_stream(self.encoder, rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
            stream.options = dict(ENCODER_OPTIONS.get(self.encoder, {}))
            _tag_bt601(stream.codec_context)
        self._stream = stream
        self._time_base = time_base

    def write(self, pixels: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one HWC uint8 RGB frame shown at ``pts`` (the source's, in its time base)."""
        import av

        if self._last_pts is not None and pts <= self._last_pts:
            raise ModelError(f"frames out of order: pts {pts} after {self._last_pts}")
        with av_errors("cannot encode a frame", ModelError):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = pts
            frame.time_base = self._time_base
            if duration:
                frame.duration = duration
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        self._last_pts = pts
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        with av_errors("cannot finish the video", ModelError):
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._out.close()

    def abort(self) -> None:
        """Give up on the file (it is left incomplete; the caller deletes it)."""
        try:
            self._out.close()
        except Exception:  # already broken; nothing to save
            pass

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class JoinStats:
    """What the join wrote."""

    frames: int
    audio: str | None  # "copy", the encoder that transcoded it, or None without audio


def audio_action(codec: str, container: str) -> str:
    """``copy`` when ``container`` holds the audio codec as it is, else the encoder to use."""
    if container == "matroska":
        return "copy"
    if codec in _AUDIO_COPY.get(container, set()):
        return "copy"
    return "libopus" if container == "webm" else "aac"


def join_segments(segments: Sequence[str], out_path: str, spec: OutputSpec,
                  audio_source: Any | None = None) -> JoinStats:
    """Concatenate segment files, in order, into ``out_path`` by packet copy.

    ``audio_source``: an open input container whose first audio stream is copied (or, where
    the container cannot hold it, transcoded). Video and audio packets are interleaved by
    time, so the file plays and seeks well.
    """
    import av

    if spec.container is None:
        raise InvalidItem("frames outputs are not joined")
    if not segments:
        raise InvalidItem("no segments to join")
    opened: list[Any] = []
    out: Any = None
    try:
        with av_errors("cannot read a segment", ModelError):
            for path in segments:
                opened.append(av.open(path, mode="r", format="mp4"))
            template = opened[0].streams.video[0]
            _check_compatible(opened)
        options = {"movflags": "+faststart"} if spec.container in ("mp4", "mov") else {}
        with av_errors("cannot write the video", ModelError):
            out = av.open(out_path, mode="w", format=spec.container, options=options)
            ov = out.add_stream_from_template(template)
        audio = None
        in_audio = None
        if audio_source is not None and audio_source.streams.audio:
            in_audio = audio_source.streams.audio[0]
            audio = audio_action(str(in_audio.codec_context.name), spec.container)
        with av_errors("cannot join the video", ModelError):
            if in_audio is not None and audio is not None:
                if audio == "copy":
                    oa = out.add_stream_from_template(in_audio)
                    audio_packets = _copied(audio_source, in_audio, oa)
                else:
                    audio_packets = _transcoded(audio_source, in_audio, out, audio)
            else:
                audio_packets = iter(())
            frames = 0
            for packet in _merge(_video_packets(opened, ov), audio_packets):
                if packet.stream is ov:
                    frames += 1
                out.mux(packet)
            out.close()
            out = None
        return JoinStats(frames=frames, audio=audio)
    finally:
        for c in opened:
            c.close()
        if out is not None:
            try:
                out.close()
            except Exception:  # the file is discarded by the caller
                pass


def _check_compatible(opened: list[Any]) -> None:
    first = opened[0].streams.video[0].codec_context
    for n, c in enumerate(opened[1:], 1):
        cc = c.streams.video[0].codec_context
        if (cc.name, cc.width, cc.height, cc.extradata) != (first.name, first.width,
                                                            first.height, first.extradata):
            raise ModelError(f"segment {n} was encoded differently from segment 0 "
                             f"({cc.name} {cc.width}x{cc.height} vs {first.name} "
                             f"{first.width}x{first.height}); it cannot be joined by copy")


def _video_packets(opened: list[Any], ov: Any) -> Iterator[Any]:
    last = None
    for c in opened:
        stream = c.streams.video[0]
        for packet in c.demux(stream):
            if packet.size == 0:
                continue
            if last is not None and packet.dts is not None and \
                    packet.dts * packet.time_base <= last:
                raise ModelError("segments overlap in time; they cannot be joined")
            if packet.dts is not None:
                last = packet.dts * packet.time_base
            packet.stream = ov
            yield packet


def _copied(container: Any, stream: Any, out_stream: Any) -> Iterator[Any]:
    container.seek(0)
    for packet in container.demux(stream):
        if packet.size == 0 or packet.dts is None:
            continue
        packet.stream = out_stream
        yield packet


def _transcoded(container: Any, stream: Any, out: Any, encoder: str) -> Iterator[Any]:
    import av

    rate = 48000 if encoder == "libopus" else (stream.codec_context.sample_rate or 48000)
    layout = stream.codec_context.layout.name if stream.codec_context.layout else "stereo"
    if stream.codec_context.channels > 2:
        layout = "stereo"
    oa = out.add_stream(encoder, rate=rate)
    oa.layout = layout
    fmt = "flt" if encoder == "libopus" else "fltp"
    resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
    container.seek(0)
    start = stream.start_time * stream.time_base if stream.start_time is not None else 0
    samples = 0

    def encode(frames: list[Any]) -> Iterator[Any]:
        nonlocal samples
        for f in frames:
            f.pts = int(start * rate) + samples
            f.time_base = Fraction(1, rate)
            samples += f.samples
            yield from oa.encode(f)

    for frame in container.decode(stream):
        yield from encode(resampler.resample(frame))
    yield from encode(resampler.resample(None))
    yield from oa.encode(None)


def _when(packet: Any) -> Fraction:
    ts = packet.dts if packet.dts is not None else packet.pts
    return Fraction(ts or 0) * packet.time_base


def _merge(a: Iterator[Any], b: Iterator[Any]) -> Iterator[Any]:
    """Two packet streams in time order (each already in order)."""
    pa, pb = next(a, None), next(b, None)
    while pa is not None or pb is not None:
        if pb is None or (pa is not None and _when(pa) <= _when(pb)):
            yield pa
            pa = next(a, None)
        else:
            yield pb
            pb = next(b, None)
