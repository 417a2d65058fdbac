"""Video inputs behind one interface: files (local or S3, read in ranges) and frame folders.

A :class:`VideoSource` knows its :class:`~capvst.video.probe.VideoInfo` and decodes exactly the
frames of a :class:`~capvst.video.probe.Segment`, seeking to the keyframe before it. Workers
open a source with the ``info`` the scheduler planned with, so no worker demuxes a whole file.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from PIL import Image

from ..errors import BadVideo, CapvstError, InvalidItem, NotFound, TooLarge
from ..storage import parse
from .media import (
    FRAME_EXTENSIONS,
    SNIFF_BYTES,
    VIDEO_EXTENSIONS,
    RangeReader,
    av_errors,
    natural_key,
    open_input,
    sniff,
)
from .probe import DEFAULT_FRAMES_FPS, Segment, VideoInfo, VideoLimits, frames_info, probe

if TYPE_CHECKING:
    from ..storage import Storage

_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the video, timing, and RGB pixels (display upright)."""

    index: int
    pts: int
    duration: int
    image: Image.Image


def is_frames_uri(store: Storage, uri: str) -> bool:
    """Whether ``uri`` names a folder or prefix of frames rather than one file."""
    if uri.endswith("/"):
        return True
    loc = store.check(uri)
    return loc.scheme == "file" and os.path.isdir(loc.path)


def is_video_uri(store: Storage, uri: str) -> bool:
    """Whether ``uri`` is a video: a video extension, a frame folder or prefix, or (for a local
    file without an image extension) a file whose first bytes are a video container's."""
    ext = os.path.splitext(parse(uri).name)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return True
    if ext in FRAME_EXTENSIONS:
        return False
    if is_frames_uri(store, uri):
        return True
    loc = store.check(uri)
    if loc.scheme != "file":
        return False
    try:
        with open(loc.path, "rb") as fh:
            return sniff(fh.read(SNIFF_BYTES)) is not None
    except OSError:
        return False


def list_frames(store: Storage, uri: str) -> list[str]:
    """URIs of the still frames directly under a folder or prefix, in natural name order."""
    prefix = uri if uri.endswith("/") else uri + "/"
    loc = store.check(prefix)
    base = loc.path.rstrip("/")
    found = []
    for u in store.iter_uris(prefix):
        sub = parse(u).path
        rel = sub[len(base):].lstrip("/") if sub.startswith(base) else posixpath.basename(sub)
        if "/" in rel or os.sep in rel:
            continue  # only the folder itself, not sub-folders
        if os.path.splitext(rel)[1].lower() in FRAME_EXTENSIONS:
            found.append((natural_key(rel), u))
    found.sort()
    return [u for _, u in found]


class VideoSource:
    """An opened video: its facts and the frames of any segment."""

    def __init__(self, uri: str, info: VideoInfo, *, file: str | BinaryIO | None = None,
                 frame_uris: list[str] | None = None, store: Storage | None = None,
                 max_frame_bytes: int | None = None, limits: VideoLimits | None = None) -> None:
        self.uri = uri
        self.info = info
        self._file = file
        self._frame_uris = frame_uris
        self._store = store
        self._max_frame_bytes = max_frame_bytes
        self._limits = limits or VideoLimits()

    @property
    def name(self) -> str:
        """A short name for messages."""
        return parse(self.uri).name or self.uri

    def open_container(self) -> Any:
        """A fresh PyAV input container of the file (for the audio stream at the join)."""
        if self._file is None:
            raise InvalidItem("a frame folder has no container")
        return open_input(self._file, name=self.name)

    def segment_frames(self, segment: Segment, *, previous: bool = False) -> Iterator[Frame]:
        """Exactly the frames ``[start, end)`` of ``segment``, preceded by frame ``start - 1``
        when ``previous`` (and there is one). BadVideo when the file holds fewer."""
        first = segment.start - 1 if previous and segment.start > 0 else segment.start
        count = segment.end - first
        if self._frame_uris is not None:
            yield from self._still_frames(first, segment.end)
            return
        pts_from = segment.prev_pts if first < segment.start else segment.pts_start
        if pts_from is None:
            raise InvalidItem("the segment lacks the timestamp of the frame before it")
        yield from self._decode(pts_from, segment.pts_end, first, count)

    def _still_frames(self, first: int, end: int) -> Iterator[Frame]:
        from ..images import decode_image

        assert self._frame_uris is not None and self._store is not None
        uris = self._frame_uris
        if end > len(uris):
            raise BadVideo(f"{self.name} holds {len(uris)} frames, the segment needs {end}")
        for i in range(first, end):
            data = self._store.read(uris[i], self._max_frame_bytes)
            img = decode_image(data, self._limits.max_pixels)
            yield Frame(index=i, pts=i, duration=1, image=img)

    def _decode(self, pts_from: int, pts_to: int | None, first: int, count: int
                ) -> Iterator[Frame]:
        assert self._file is not None
        reader = self._file if isinstance(self._file, RangeReader) else None
        for seek in (True, False):  # without seeking when the index sends us past the frame
            container = open_input(self._file, name=self.name)
            try:
                got = 0
                with av_errors(f"cannot decode {self.name}", reader=reader):
                    v = _video_stream(container)
                    v.thread_type = "AUTO"
                    if seek and pts_from > self.info.start_pts:
                        container.seek(pts_from, stream=v, backward=True, any_frame=False)
                    decoded = container.decode(v)
                    while True:
                        with av_errors(f"cannot decode {self.name}", reader=reader):
                            frame = next(decoded, None)
                        if frame is None:
                            break
                        ts = frame.pts
                        if ts is None:
                            raise BadVideo(f"{self.name}: a decoded frame has no timestamp")
                        if got == 0 and ts > pts_from:
                            if seek:
                                break  # landed after the first frame we need: start over
                            raise BadVideo(f"{self.name}: the frame at pts {pts_from} is "
                                           "missing")
                        if ts < pts_from or (pts_to is not None and ts >= pts_to):
                            continue
                        img = frame.to_image()
                        if self.info.rotation:
                            img = img.transpose(_TRANSPOSE[self.info.rotation])
                        yield Frame(index=first + got, pts=int(ts),
                                    duration=int(frame.duration or 0), image=img)
                        got += 1
                        if got == count:
                            return
                if got == 0 and seek:
                    continue
                raise BadVideo(f"{self.name} is truncated or corrupt: {got} of {count} frames "
                               f"from frame {first} could be decoded")
            finally:
                container.close()


def _video_stream(container: Any) -> Any:
    from .probe import video_stream

    return video_stream(container)


def _range_fetch(store: Storage, uri: str) -> Any:
    def fetch(start: int, length: int) -> bytes:
        buf = bytearray()
        chunks = store.iter_chunks(uri, start, chunk_size=1 << 20)
        try:
            for chunk in chunks:
                buf += chunk
                if len(buf) >= length:
                    break
        finally:
            chunks.close()  # type: ignore[attr-defined]
        return bytes(buf[:length])

    return fetch


@contextmanager
def open_video(store: Storage, uri: str, limits: VideoLimits | None = None, *,
               info: VideoInfo | None = None, fps: float | None = None,
               max_frame_bytes: int | None = None) -> Iterator[VideoSource]:
    """Open a video file or a frame folder/prefix at ``uri``.

    Without ``info`` the video is probed (every packet demuxed; limits checked); with it
    (a worker holding the scheduler's plan) nothing but the opening is read. S3 files are read
    in ranged blocks, never downloaded whole. ``fps`` is the frame rate of a frame folder.
    """
    limits = limits or VideoLimits()
    if is_frames_uri(store, uri):
        uris = list_frames(store, uri)
        if not uris:
            raise NotFound(f"{uri} holds no frames ({', '.join(sorted(FRAME_EXTENSIONS))})")
        if len(uris) > limits.max_frames:
            raise TooLarge(f"{uri} holds {len(uris):,} frames, over the limit of "
                           f"{limits.max_frames:,} (CAPVST_MAX_VIDEO_FRAMES)")
        if info is None or info.frames != len(uris):
            if info is not None:
                raise BadVideo(f"{uri} changed: {len(uris)} frames, {info.frames} planned")
            info = _frames_probe(store, uris, fps or DEFAULT_FRAMES_FPS, limits,
                                 max_frame_bytes)
        yield VideoSource(uri, info, frame_uris=uris, store=store,
                          max_frame_bytes=max_frame_bytes, limits=limits)
        return
    loc = store.check(uri)
    size = store.size(uri)
    if size is None:
        raise NotFound(f"{uri} does not exist")
    if size > limits.max_bytes:
        raise TooLarge(f"{uri} is {size:,} bytes, over the limit of {limits.max_bytes:,} "
                       "(CAPVST_MAX_VIDEO_BYTES)")
    if size == 0:
        raise BadVideo(f"{loc.name} is empty (0 bytes)")
    file: str | BinaryIO
    if loc.scheme == "file":
        file = loc.path
    else:
        file = RangeReader(_range_fetch(store, uri), size)  # type: ignore[assignment]
    try:
        if info is None:
            info = probe(file, limits, name=loc.name)
        yield VideoSource(uri, info, file=file, store=store, limits=limits)
    finally:
        if isinstance(file, RangeReader):
            file.close()


def _frames_probe(store: Storage, uris: list[str], fps: float, limits: VideoLimits,
                  max_frame_bytes: int | None) -> VideoInfo:
    """The first frame's size (header only) stands for all; frames are checked as decoded."""
    from ..images import decode_image

    try:
        first = decode_image(store.read(uris[0], max_frame_bytes), limits.max_pixels)
    except CapvstError:
        raise
    return frames_info(len(uris), first.width, first.height, fps, limits)
