"""One loaded model, ready to stylize many images: the API the CLI and the workers share."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import images
from .errors import InvalidItem, ModelError
from .model import cwct
from .model.checkpoint import LoadedModel
from .types import Mode

log = logging.getLogger(__name__)

StyleSource = Image.Image | Callable[[], Image.Image]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return dev


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    # CUDA: "CUDA out of memory"; CPU allocator: "DefaultCPUAllocator: can't allocate memory"
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


class Stylizer:
    """Holds one network on one device and caches style statistics by key.

    Thread-safe for the cache; model calls are serialised by a lock so one process never runs
    two forward passes on the same device at once.
    """

    def __init__(self, model: LoadedModel, device: str | torch.device = "auto",
                 transform_dtype: torch.dtype = torch.float64, style_cache_size: int = 64) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.net = model.net.to(self.device)
        self.mode: Mode = model.mode
        self.model_id = model.model_id
        self.transform_dtype = transform_dtype
        self.style_cache_size = style_cache_size
        self._cache: OrderedDict[tuple[str, int], cwct.Moments] = OrderedDict()
        self._lock = threading.RLock()
        self.cache_hits = 0
        self.cache_misses = 0

    # -- building blocks -------------------------------------------------------------------
    @contextmanager
    def _memory_policy(self, what: str) -> Iterator[None]:
        """Out of memory fails the item with ``model_error``; the process stays healthy."""
        try:
            yield
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ModelError(f"out of memory while {what} on {self.device}; "
                             "use a smaller max_size") from None

    def encode(self, img: Image.Image) -> Tensor:
        """Latent of an already resized RGB image."""
        x = images.to_tensor(img).to(self.device)
        with self._lock, torch.inference_mode(), self._memory_policy("encoding"):
            return self.net(x)

    def decode(self, latent: Tensor) -> np.ndarray:
        """8-bit HWC pixels of a latent (the original's clamp and truncation)."""
        with self._lock, torch.inference_mode(), self._memory_policy("decoding"):
            return images.to_uint8(self.net.inverse(latent))

    def style_moments(self, style: StyleSource, max_size: int, key: str | None = None
                      ) -> cwct.Moments:
        """Statistics of a style image, from the cache when ``key`` was seen at this size."""
        ck = (key, max_size) if key is not None else None
        if ck is not None:
            with self._lock:
                hit = self._cache.get(ck)
                if hit is not None:
                    self._cache.move_to_end(ck)
                    self.cache_hits += 1
                    return hit
        img = style() if callable(style) else style
        latent = self.encode(images.resize(img, max_size))
        with self._memory_policy("computing style statistics"):
            stats = cwct.style_moments(latent, self.transform_dtype)
        if ck is not None and self.style_cache_size > 0:
            with self._lock:
                self.cache_misses += 1
                self._cache[ck] = stats
                while len(self._cache) > self.style_cache_size:
                    self._cache.popitem(last=False)
        return stats

    def has_style(self, key: str, max_size: int) -> bool:
        """Whether statistics for ``key`` at ``max_size`` are cached."""
        with self._lock:
            return (key, max_size) in self._cache

    def device_memory(self) -> int:
        """Bytes held on this model's device: CUDA memory reserved by PyTorch's allocator,
        or, on the CPU, this process's resident memory."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_reserved(self.device))
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    # -- the whole pipeline ----------------------------------------------------------------
    def stylize(self, content: Image.Image, styles: Sequence[StyleSource], *,
                weights: Sequence[float] | None = None, alpha_c: float = 0.0,
                max_size: int = images.DEFAULT_MAX_SIZE,
                content_mask: images.Source | None = None,
                style_mask: images.Source | None = None,
                style_keys: Sequence[str | None] | None = None) -> np.ndarray:
        """Stylize decoded RGB ``content`` with one style or a weighted mix; HWC uint8 out.

        Images are resized here by the original's rule. Masks (both or neither, one style only)
        switch to the per-label transform.
        """
        if not styles:
            raise InvalidItem("at least one style is needed")
        try:
            alpha_c = cwct.check_alpha(alpha_c)
            weights = cwct.check_weights(len(styles), weights)
        except ValueError as exc:
            raise InvalidItem(str(exc)) from None
        if (content_mask is None) != (style_mask is None):
            raise InvalidItem("masks come in pairs: give both content_mask and style_mask")
        keys = list(style_keys) if style_keys is not None else [None] * len(styles)
        c_img = images.resize(content, max_size)
        z_c = self.encode(c_img)
        if content_mask is not None and style_mask is not None:
            if len(styles) != 1:
                raise InvalidItem("masks work with exactly one style")
            s0 = styles[0]
            s_img = images.resize(s0() if callable(s0) else s0, max_size)
            c_mask = images.decode_mask(content_mask, c_img.size)
            s_mask = images.decode_mask(style_mask, s_img.size)
            z_s = self.encode(s_img)
            with self._memory_policy("transforming"):
                z_cs = cwct.transfer_masked(z_c, z_s, c_mask, s_mask, alpha_c,
                                            self.transform_dtype)
        else:
            stats = [self.style_moments(s, max_size, k) for s, k in zip(styles, keys)]
            with self._memory_policy("transforming"):
                z_cs = cwct.transfer(z_c, stats, weights, alpha_c, self.transform_dtype)
        return self.decode(z_cs)
