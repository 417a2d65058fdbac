"""Small, deterministic test inputs: images, masks and manifests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_bytes(size: tuple[int, int] = (64, 48), seed: int = 0, fmt: str = "PNG") -> bytes:
    """A smooth random colour field (photo-like statistics) of ``size`` (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 12, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def mask_bytes(size: tuple[int, int], split: float = 0.5) -> bytes:
    """A two-label colour mask in the authors' code: white left, blue right."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : int(w * split)] = 255
    arr[:, int(w * split):] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
