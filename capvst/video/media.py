"""Opening videos safely with PyAV: container sniffing, a pinned demuxer, error mapping.

Every PyAV (FFmpeg) failure on an input becomes :class:`~capvst.errors.BadVideo`, so a broken
upload fails its item and never takes a process down. The demuxer is chosen from the file's
first bytes, never by FFmpeg's own probing, so a hostile "video" cannot be read as a playlist
or concat script that opens other files or URLs.
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import BadVideo, CapvstError, ModelError, NotFound, TooLarge

if TYPE_CHECKING:
    import av.container

#: Extensions read as video files.
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm"})
#: Extensions of the still frames of a frame folder or prefix.
FRAME_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
#: Demuxers we allow, by container family (FFmpeg short names).
_MP4_ATOMS = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}
#: Bytes needed by :func:`sniff`.
SNIFF_BYTES = 12


def sniff(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file starting with ``head`` (``mov``, ``matroska``, ``avi``),
    or None when it is none of the containers we read."""
    if len(head) >= 8 and head[4:8] in _MP4_ATOMS:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


_PACKAGES = {"av": "PyAV (av)", "cv2": "OpenCV (opencv-python-headless)"}


def require(module: str) -> Any:
    """Import PyAV (``av``) or OpenCV (``cv2``), or say how to install them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"videos need {_PACKAGES.get(module, module)}, which is not "
                         "installed: pip install 'capvst[video]'") from None


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``frame_2`` before ``frame_10`` (digits compared as numbers)."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts if p)


@contextmanager
def av_errors(what: str, cls: type[CapvstError] = BadVideo,
              reader: RangeReader | None = None) -> Iterator[None]:
    """Map every PyAV / FFmpeg failure inside the block to ``cls`` (BadVideo by default).

    A failure of the storage under ``reader`` (a passing S3 fault, say) is raised as itself,
    so that it is retried rather than blamed on the video.
    """
    av = require("av")

    try:
        yield
    except CapvstError:
        raise
    except MemoryError:
        raise TooLarge(f"out of memory while {what}") from None
    except (av.FFmpegError, OSError, ValueError, IndexError, KeyError, EOFError,
            ZeroDivisionError, OverflowError, TypeError, AssertionError, RuntimeError,
            UnicodeDecodeError) as exc:
        # FileNotFoundError of a local path is the caller's business (not_found)
        if isinstance(exc, FileNotFoundError) and not isinstance(exc, av.FFmpegError):
            raise
        if reader is not None and reader.failure is not None:
            raise reader.failure from None
        # FFmpeg's own words without the errno and the file name
        detail = (getattr(exc, "strerror", None) if isinstance(exc, av.FFmpegError) else None
                  ) or str(exc).strip() or type(exc).__name__
        raise cls(f"{what}: {detail}") from None


def open_input(source: str | BinaryIO, *, name: str = "video") -> av.container.InputContainer:
    """Open a video for reading with the demuxer its first bytes name; BadVideo otherwise."""
    av = require("av")

    if isinstance(source, str):
        try:
            with open(source, "rb") as fh:
                head = fh.read(SNIFF_BYTES)
        except FileNotFoundError:
            raise NotFound(f"{name} does not exist") from None
        except IsADirectoryError:
            raise BadVideo(f"{name} is a directory, not a video file") from None
    else:
        source.seek(0)
        head = source.read(SNIFF_BYTES)
        source.seek(0)
    if not head:
        raise BadVideo(f"{name} is empty (0 bytes)")
    fmt = sniff(head)
    if fmt is None:
        raise BadVideo(f"{name} is not an MP4, MOV, MKV, WebM or AVI video")
    reader = source if isinstance(source, RangeReader) else None
    with av_errors(f"cannot open {name}", reader=reader):
        container: Any = av.open(source, mode="r", format=fmt,
                                 options={"probesize": str(32 << 20)})
    if not container.streams.video:
        container.close()
        raise BadVideo(f"{name} has no video stream")
    return container  # type: ignore[no-any-return]


class RangeReader(io.RawIOBase):
    """A seekable, read-only file over an object read in ranged blocks (for S3 videos).

    PyAV seeks around (an MP4's index is often at its end): reading whole blocks and keeping a
    few keeps both the number of requests and the bytes fetched close to what is decoded.
    """

    def __init__(self, fetch: Any, size: int, block: int = 4 << 20, keep: int = 8) -> None:
        super().__init__()
        self._fetch = fetch  # fetch(start, length) -> bytes
        self._size = size
        self._block = block
        self._keep = keep
        self._pos = 0
        self._blocks: dict[int, bytes] = {}
        self.requests = 0
        #: The storage error that made a read fail (FFmpeg only sees "I/O error").
        self.failure: CapvstError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        self._pos = max(0, pos)
        return self._pos

    def _get(self, n: int) -> bytes:
        data = self._blocks.get(n)
        if data is None:
            start = n * self._block
            try:
                data = self._fetch(start, min(self._block, self._size - start))
            except CapvstError as exc:
                self.failure = exc
                raise
            self.requests += 1
            self._blocks[n] = data
            while len(self._blocks) > self._keep:
                self._blocks.pop(next(iter(self._blocks)))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        done = 0
        while done < want:
            n, off = divmod(self._pos, self._block)
            data = self._get(n)
            take = min(want - done, len(data) - off)
            if take <= 0:
                break
            view[done:done + take] = data[off:off + take]
            done += take
            self._pos += take
        return done
