"""Image decoding, the original's resize rule, tensor conversion and encoding.

Decoding accepts anything Pillow reads (JPEG, PNG, WebP, TIFF, GIF, ...; L, LA, P, RGBA, CMYK,
16-bit) and returns 8-bit RGB with EXIF orientation applied. Animated images use their first
frame. Sizes are checked from the header before any pixel is decoded, so a decompression bomb
costs nothing.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, InvalidItem, ModelError, TooLarge, TooSmall

if TYPE_CHECKING:  # PyTorch is imported where tensors are made, not by the scheduler
    from torch import Tensor

OutputFormat = Literal["png", "jpg", "webp"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpg", "webp")
#: Default pixel limit of a decoded input (width × height).
DEFAULT_MAX_PIXELS = 100_000_000
#: The original's default long-edge limit.
DEFAULT_MAX_SIZE = 1280
#: Sides are floored to a multiple of this (the network downsamples by 4).
SIDE_MULTIPLE = 4
#: Smallest side the network can process: its reflection padding at 1/4 scale needs two
#: pixels, so a 4-pixel side (legal by the multiple-of-4 rule) cannot run either.
MIN_SIDE = 8
#: Default zlib level of PNG outputs: 1 is about four times faster to encode than Pillow's
#: default 6 for a few percent larger files, with the same pixels (docs/PERFORMANCE.md).
DEFAULT_PNG_LEVEL = 1
#: Default JPEG and WebP quality of outputs.
LOSSY_QUALITY = 95

Source = bytes | str | os.PathLike[str] | BinaryIO

# Colour code of the authors' segmentation masks (RGB -> label).
MASK_COLOURS: dict[tuple[int, int, int], int] = {
    (0, 0, 0): 0,
    (255, 255, 255): 1,
    (0, 255, 0): 2,
    (0, 0, 255): 3,
    (255, 0, 0): 4,
    (255, 255, 0): 5,
    (128, 128, 128): 6,
    (0, 255, 255): 7,
    (255, 0, 255): 8,
}


def _open(source: Source, max_pixels: int) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise BadImage("empty file (0 bytes)")
        fp: BinaryIO | str | os.PathLike[str] = io.BytesIO(source)
    else:
        fp = source
    try:
        with warnings.catch_warnings():
            # our own limit below (CAPVST_MAX_PIXELS) replaces Pillow's warning and bomb check,
            # which would otherwise refuse images over 2 × 89.5 megapixels whatever is set
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max(max_pixels, saved or 0)
            try:
                img = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image is over the pixel limit, a possible decompression bomb ({exc})"
                       ) from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except FileNotFoundError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure is a property of the bytes, not of us
        raise BadImage(f"cannot read image: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise TooLarge(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    return img


def _load(img: Image.Image) -> Image.Image:
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # size already checked by _open
        img.load()
        return ImageOps.exif_transpose(img) or img
    except MemoryError:
        raise
    except Exception as exc:  # e.g. NotImplementedError for unsupported DDS or TIFF variants
        raise BadImage(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes scaled (not clipped) to 8 bits.

    Works in bands of rows with integer arithmetic, so a 100-megapixel 16-bit image costs
    its own pixels plus the 8-bit result, not several float64 copies.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        top = 65535 if img.mode.startswith("I;16") or int(arr.max(initial=0)) > 255 else 255
        out = np.empty(arr.shape, dtype=np.uint8)
        for r in range(0, arr.shape[0], 512):
            band = arr[r:r + 512].astype(np.int64)
            # round(v / top * 255) with integers: (2·255·v + top) // (2·top)
            out[r:r + 512] = np.clip((band * 510 + top) // (2 * top), 0, 255)
        return Image.fromarray(out)
    if img.mode == "F":
        arr = np.asarray(img)
        scale = 255.0 if float(arr.max(initial=0)) <= 1.0 else 1.0
        out = np.empty(arr.shape, dtype=np.uint8)
        for r in range(0, arr.shape[0], 512):
            out[r:r + 512] = np.clip(np.rint(arr[r:r + 512] * scale), 0, 255)
        return Image.fromarray(out)
    return img


def decode_image(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to 8-bit RGB, EXIF orientation applied; BadImage / TooLarge on bad input."""
    img = _load(_open(source, max_pixels))
    img = _to_8bit(img)
    if img.mode != "RGB":
        img = img.convert("RGB")  # the original's conversion (alpha dropped, CMYK naive)
    return img


def resized_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """The size :func:`resize` produces (width, height); ``max_size`` 0 keeps the size."""
    long_edge = max(width, height)
    if max_size and long_edge > max_size:
        width = int(width / long_edge * max_size)
        height = int(height / long_edge * max_size)
    return width // SIDE_MULTIPLE * SIDE_MULTIPLE, height // SIDE_MULTIPLE * SIDE_MULTIPLE


def resize(img: Image.Image, max_size: int = DEFAULT_MAX_SIZE) -> Image.Image:
    """The original's rule: long edge down to ``max_size`` then sides floored to multiples of
    4, each step a bicubic resize. ``max_size`` 0 is full resolution (only the flooring).
    TooSmall when a side would be under 8 pixels."""
    if max_size != 0 and max_size < MIN_SIDE:
        raise InvalidItem(f"max_size must be 0 (full resolution) or at least {MIN_SIDE}, "
                          f"got {max_size}")
    w, h = img.size
    fw, fh = resized_size(w, h, max_size)
    if fw < MIN_SIDE or fh < MIN_SIDE:
        raise TooSmall(f"image is {w}x{h}, {fw}x{fh} after resizing; the network needs sides "
                       f"of at least {MIN_SIDE} pixels")
    long_edge = max(w, h)
    if max_size and long_edge > max_size:
        img = img.resize((int(w / long_edge * max_size), int(h / long_edge * max_size)),
                         Image.Resampling.BICUBIC)
    if img.size != (fw, fh):
        img = img.resize((fw, fh), Image.Resampling.BICUBIC)
    return img


def to_tensor(img: Image.Image) -> Tensor:
    """uint8 RGB image -> float32 ``[1, 3, H, W]`` in [0, 1] (the original's division)."""
    import torch

    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def to_uint8(x: Tensor) -> np.ndarray:
    """``[1, 3, H, W]`` float -> HWC uint8: scale by 255, clamp, truncate (the original's)."""
    import torch

    if not bool(torch.isfinite(x).all()):
        raise ModelError("the network produced non-finite values")
    y = (x.detach()[0].float() * 255).clamp(0, 255).to(torch.uint8)
    return y.permute(1, 2, 0).cpu().numpy()


def format_for(path: str, default: OutputFormat = "png") -> OutputFormat:
    """Output format named by a file extension (``.png``, ``.jpg``/``.jpeg``, ``.webp``)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not ext:
        return default
    if ext == "jpeg":
        ext = "jpg"
    if ext not in OUTPUT_FORMATS:
        raise InvalidItem(f"unsupported output format .{ext}; use one of "
                          + ", ".join("." + f for f in OUTPUT_FORMATS))
    return ext  # type: ignore[return-value]


def encode(pixels: np.ndarray, fmt: OutputFormat = "png", *, png_level: int | None = None,
           jpeg_quality: int | None = None, webp_quality: int | None = None) -> bytes:
    """Encode HWC uint8 RGB pixels; deterministic for a given Pillow version.

    ``png_level`` (zlib 0–9, default :data:`DEFAULT_PNG_LEVEL`) changes only the file size and
    the time; ``jpeg_quality`` (1–100) and ``webp_quality`` (0–100, default
    :data:`LOSSY_QUALITY`) the lossy formats' fidelity. Each applies to its format only.
    """
    img = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG",
                 compress_level=DEFAULT_PNG_LEVEL if png_level is None else png_level)
    elif fmt == "jpg":
        img.save(buf, format="JPEG",
                 quality=LOSSY_QUALITY if jpeg_quality is None else jpeg_quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP",
                 quality=LOSSY_QUALITY if webp_quality is None else webp_quality, method=4)
    else:
        raise InvalidItem(f"unsupported output format {fmt!r}")
    return buf.getvalue()


def decode_mask(source: Source, size: tuple[int, int],
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A segmentation mask as a ``[H, W]`` uint8 label map at ``size`` (width, height).

    Colour masks use the authors' colour code (nearest colour for anti-aliased edges);
    single-channel masks (L) are label maps already. Masks of another size are resized with
    nearest-neighbour sampling.
    """
    return mask_labels(_to_8bit(_load(_open(source, max_pixels))), size)


def mask_labels(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The label map of an already decoded mask image (see :func:`decode_mask`)."""
    if img.mode in ("1", "L", "LA"):
        img = img.convert("L")
        if img.size != size:
            img = img.resize(size, Image.Resampling.NEAREST)
        return np.asarray(img, dtype=np.uint8).copy()
    img = img.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.Resampling.NEAREST)
    rgb = np.asarray(img, dtype=np.int16)
    best = np.full(rgb.shape[:2], np.iinfo(np.int16).max, dtype=np.int16)
    out = np.zeros(rgb.shape[:2], dtype=np.uint8)
    # nearest palette colour by L1 distance; strict '<' keeps the first colour on ties
    for colour, label in MASK_COLOURS.items():
        dist = np.abs(rgb - np.array(colour, dtype=np.int16)).sum(-1, dtype=np.int16)
        closer = dist < best
        best[closer] = dist[closer]
        out[closer] = label
    return out
