"""Video items: probe, plan segments at keyframes, stylize segments, join, warping error.

The flow, the same for the queue and for ``capvst stylize``::

    with open_video(store, uri, limits) as src:          # probe (scheduler), no PyTorch
        segments = plan_segments(src.info, seconds)       # frame ranges cut at keyframes
    # per segment, on any worker (the one step that runs the model):
    with open_video(store, uri, limits, info=info) as src:
        result = stylize_segment(src, segment, FrameStylizer(...), spec, store,
                                 segment_uri=..., output_uri=...)
    # once every segment has a result:
    with open_video(store, uri, limits, info=info) as src:
        video = join_video(src, results, spec, store, output_uri)

Only :class:`FrameStylizer` needs PyTorch (and imports it when built); everything else needs
PyAV, NumPy and (for the warping error) OpenCV. Names are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_NAMES = {
    "media": ("VIDEO_EXTENSIONS", "FRAME_EXTENSIONS", "sniff", "natural_key", "RangeReader"),
    "probe": ("VideoInfo", "Segment", "VideoLimits", "probe", "plan_segments", "frames_info",
              "check_limits", "DEFAULT_SEGMENT_SECONDS", "DEFAULT_FRAMES_FPS"),
    "source": ("VideoSource", "Frame", "open_video", "is_video_uri", "is_frames_uri",
               "list_frames"),
    "encode": ("OutputSpec", "VideoFormat", "VIDEO_FORMATS", "output_spec",
               "available_encoders", "video_encoder", "SegmentWriter", "join_segments",
               "frame_name", "audio_action"),
    "warp": ("WarpStats", "WarpMeter", "pair_error", "warping_error"),
    "run": ("FrameStylizer", "ContentMask", "SegmentResult", "VideoResult", "stylize_segment",
            "join_video", "stylize_video", "read_segment_result", "result_uri",
            "open_content_mask"),
}
_WHERE = {name: mod for mod, names in _NAMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(name)
    return getattr(import_module(f"{__name__}.{mod}"), name)
