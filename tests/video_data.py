"""Small, deterministic test videos made with PyAV: a smooth colour field panning across the
frame (so consecutive frames are related by a known motion) and a sine tone for audio."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
from PIL import Image


def _scene(width: int, height: int, frames: int, seed: int) -> np.ndarray:
    """A smooth random field wide and tall enough to pan ``frames`` steps across."""
    rng = np.random.default_rng(seed)
    big_w, big_h = width + 2 * frames + 8, height + frames + 8
    base = rng.random((big_h // 6 + 2, big_w // 6 + 2, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((big_w, big_h),
                                                               Image.Resampling.BICUBIC)
    return np.asarray(img)


def frame_pixels(i: int, size: tuple[int, int] = (64, 48), frames: int = 36,
                 seed: int = 0) -> np.ndarray:
    """Frame ``i`` of the panning scene: moves 2 px right and 1 px down per frame."""
    w, h = size
    scene = _scene(w, h, frames, seed)
    return np.ascontiguousarray(scene[i:i + h, 2 * i:2 * i + w])


def make_video(path: str | os.PathLike[str], *, seconds: float = 3.0, fps: int = 12,
               size: tuple[int, int] = (64, 48), audio: str | None = "aac",
               keyint: int | None = None, codec: str = "libx264", fmt: str | None = None,
               faststart: bool = False, seed: int = 0) -> str:
    """Write a test video: ``seconds`` at ``fps`` of ``size``, a keyframe every ``keyint``
    frames (default: every second), and a 440 Hz tone in ``audio`` (None: silent film).

    ``codec`` libx264 (MP4, MOV, MKV), libvpx-vp9 (WebM) or mpeg4 (AVI)."""
    import av

    path = str(path)
    n = int(round(seconds * fps))
    keyint = keyint or fps
    w, h = size
    scene = _scene(w, h, n, seed)
    options = {"movflags": "+faststart"} if faststart else {}
    out = av.open(path, mode="w", format=fmt, options=options)
    vs = out.add_stream(codec, rate=fps)
    vs.width, vs.height = w, h
    vs.pix_fmt = "yuv420p"
    if codec == "libx264":
        vs.options = {"g": str(keyint), "keyint_min": str(keyint), "sc_threshold": "0",
                      "crf": "16"}
    else:
        vs.options = {"g": str(keyint), "keyint_min": str(keyint)}
    a_stream = None
    if audio:
        a_stream = out.add_stream(audio, rate=48000)
        a_stream.layout = "mono"
    for i in range(n):
        arr = np.ascontiguousarray(scene[i:i + h, 2 * i:2 * i + w])
        frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
        frame.pts = i
        frame.time_base = Fraction(1, fps)
        for p in vs.encode(frame):
            out.mux(p)
    for p in vs.encode(None):
        out.mux(p)
    if a_stream is not None:
        rate = 48000
        total = int(seconds * rate)
        t = np.arange(total) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        fmt_name = "s16" if audio.startswith("pcm_s16") else "fltp"
        step = a_stream.codec_context.frame_size or 1024
        for s in range(0, total, step):
            chunk = tone[s:s + step][None, :]
            if fmt_name == "s16":
                chunk = (chunk * 32767).astype(np.int16)
            af = av.AudioFrame.from_ndarray(chunk, format=fmt_name, layout="mono")
            af.sample_rate = rate
            af.pts = s
            af.time_base = Fraction(1, rate)
            for p in a_stream.encode(af):
                out.mux(p)
        for p in a_stream.encode(None):
            out.mux(p)
    out.close()
    return path


def make_frames(folder: str | os.PathLike[str], count: int = 12, size: tuple[int, int] = (64, 48),
                name: str = "f{}.png", seed: int = 0) -> list[str]:
    """Write ``count`` PNG frames of the panning scene named ``name.format(i)`` (0-based)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        p = os.path.join(str(folder), name.format(i))
        Image.fromarray(frame_pixels(i, size, count, seed)).save(p)
        paths.append(p)
    return paths


def decode_frames(path: str) -> list[Image.Image]:
    """Every frame of a video, decoded with PyAV as RGB images (presentation order)."""
    import av

    with av.open(path) as c:
        return [f.to_image() for f in c.decode(video=0)]
