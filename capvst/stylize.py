"""One loaded model, ready to stylize many images: the API the CLI and the workers share."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import images, memory
from .errors import InvalidItem, ModelError, OutOfMemory
from .model import cwct, tiled
from .model.checkpoint import LoadedModel
from .types import Mode

log = logging.getLogger(__name__)

StyleSource = Image.Image | Callable[[], Image.Image]
#: ``auto`` (untiled when the image fits the memory budget), ``off``, or a tile side in pixels.
TileOption = Literal["auto", "off"] | int


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
                 transform_dtype: torch.dtype = torch.float64, style_cache_size: int = 64,
                 memory_budget: int | None = None) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.net = model.net.to(self.device)
        self.mode: Mode = model.mode
        self.model_id = model.model_id
        self.transform_dtype = transform_dtype
        self.style_cache_size = style_cache_size
        #: Bytes one stylization may use (``CAPVST_MEMORY_BUDGET``); None: a share of what the
        #: device has free at the time.
        self.memory_budget = memory_budget
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
            raise OutOfMemory(f"out of memory while {what} on {self.device}; "
                              "use a smaller max_size or tile") from None

    def encode(self, img: Image.Image) -> Tensor:
        """Latent of an already resized RGB image."""
        x = images.to_tensor(img).to(self.device)
        with self._lock, torch.inference_mode(), self._memory_policy("encoding"):
            return self.net(x)

    def decode(self, latent: Tensor) -> np.ndarray:
        """8-bit HWC pixels of a latent (the original's clamp and truncation)."""
        with self._lock, torch.inference_mode(), self._memory_policy("decoding"):
            return images.to_uint8(self.net.inverse(latent))

    def style_moments(self, style: StyleSource, max_size: int, key: str | None = None,
                      tile: TileOption = "auto") -> cwct.Moments:
        """Statistics of a style image, from the cache when ``key`` was seen at this size.

        A style too large for the memory budget is encoded in tiles (same statistics).
        """
        ck = (key, max_size) if key is not None else None
        if ck is not None:
            with self._lock:
                hit = self._cache.get(ck)
                if hit is not None:
                    self._cache.move_to_end(ck)
                    self.cache_hits += 1
                    return hit
        img = images.resize(style() if callable(style) else style, max_size)
        side = self.tile_side(img.size[1], img.size[0], tile)
        if side is None:
            try:
                latent = self.encode(img)
                with self._memory_policy("computing style statistics"):
                    stats = cwct.style_moments(latent, self.transform_dtype)
            except OutOfMemory:
                if tile == "off":
                    raise
                side = self._smaller(img.size[1], img.size[0], None)
        while side is not None:
            try:
                with self._lock, self._memory_policy("computing style statistics in tiles"):
                    stats = tiled.image_moments(self.net, np.asarray(img), side,
                                                self.transform_dtype)
                break
            except OutOfMemory:
                side = self._smaller(img.size[1], img.size[0], side)
                if side is None:
                    raise
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

    # -- tiling ----------------------------------------------------------------------------
    def budget(self) -> int:
        """Bytes one stylization may use now."""
        if self.memory_budget is not None:
            return self.memory_budget
        return memory.default_budget(self.device)

    def tile_side(self, height: int, width: int, tile: TileOption = "auto") -> int | None:
        """Interior tile side for an image of this size, or None to run it whole."""
        if tile == "off":
            return None
        if isinstance(tile, int) and not isinstance(tile, bool):
            if tile < tiled.MIN_TILE:
                raise InvalidItem(f"tile must be at least {tiled.MIN_TILE} pixels, got {tile}")
            return tile // 4 * 4
        if tile != "auto":
            raise InvalidItem(f"tile must be auto, off or a side in pixels, got {tile!r}")
        budget = self.budget()
        if memory.untiled_bytes(height, width) + 6 * height * width <= budget:
            return None
        return self._plan(height, width, budget)[0]

    def _plan(self, height: int, width: int, budget: int) -> tuple[int, bool]:
        return tiled.plan(height, width, budget, tiled.halo(self.net),
                          memory.ACTIVATION_BYTES_PER_PIXEL, memory.LATENT_BYTES_PER_PIXEL)

    def _smaller(self, height: int, width: int, side: int | None) -> int | None:
        """The next tile side to try after running out of memory, or None to give up."""
        if side is None:
            side = self._plan(height, width, self.budget())[0]
            # the whole image did not fit: start below it
            side = min(side, max(height, width) // 2 // 4 * 4)
        else:
            side = side // 2 // 4 * 4
        if side < tiled.MIN_TILE:
            return None
        log.warning("out of memory on a %dx%d image; retrying in tiles of %d pixels",
                    width, height, side)
        return side

    # -- the whole pipeline ----------------------------------------------------------------
    def stylize(self, content: Image.Image, styles: Sequence[StyleSource], *,
                weights: Sequence[float] | None = None, alpha_c: float = 0.0,
                max_size: int = images.DEFAULT_MAX_SIZE,
                content_mask: images.Source | None = None,
                style_mask: images.Source | None = None,
                style_keys: Sequence[str | None] | None = None,
                tile: TileOption = "auto",
                progress: tiled.Progress | None = None) -> np.ndarray:
        """Stylize decoded RGB ``content`` with one style or a weighted mix; HWC uint8 out.

        Images are resized here by the original's rule (``max_size`` 0: full resolution).
        Masks (both or neither, one style only) switch to the per-label transform. ``tile``:
        ``auto`` runs the image whole when it fits the memory budget and in exact tiles
        otherwise (docs/MODEL.md); ``off``; or a tile side in pixels. Running out of memory
        retries in smaller tiles unless ``tile`` is ``off``. ``progress(done, total)`` is
        called after each tile.
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
        if content_mask is not None and len(styles) != 1:
            raise InvalidItem("masks work with exactly one style")
        keys = list(style_keys) if style_keys is not None else [None] * len(styles)
        c_img = images.resize(content, max_size)
        width, height = c_img.size
        side = self.tile_side(height, width, tile)
        if side is None:
            try:
                return self._whole(c_img, styles, weights, alpha_c, max_size, content_mask,
                                   style_mask, keys, tile)
            except OutOfMemory:
                if tile == "off":
                    raise
                side = self._smaller(height, width, None)
                if side is None:
                    raise
        while True:
            try:
                return self._tiled(c_img, styles, weights, alpha_c, max_size, content_mask,
                                   style_mask, keys, tile, side, progress)
            except OutOfMemory:
                smaller = self._smaller(height, width, side)
                if smaller is None:
                    raise
                side = smaller

    def _whole(self, c_img: Image.Image, styles: Sequence[StyleSource],
               weights: Sequence[float] | None, alpha_c: float, max_size: int,
               content_mask: images.Source | None, style_mask: images.Source | None,
               keys: Sequence[str | None], tile: TileOption) -> np.ndarray:
        z_c = self.encode(c_img)
        if content_mask is not None and style_mask is not None:
            s0 = styles[0]
            s_img = images.resize(s0() if callable(s0) else s0, max_size)
            c_mask = images.decode_mask(content_mask, c_img.size)
            s_mask = images.decode_mask(style_mask, s_img.size)
            z_s = self.encode(s_img)
            with self._memory_policy("transforming"):
                z_cs = cwct.transfer_masked(z_c, z_s, c_mask, s_mask, alpha_c,
                                            self.transform_dtype)
        else:
            stats = [self.style_moments(s, max_size, k, tile) for s, k in zip(styles, keys)]
            with self._memory_policy("transforming"):
                z_cs = cwct.transfer(z_c, stats, weights, alpha_c, self.transform_dtype)
        return self.decode(z_cs)

    def _tiled(self, c_img: Image.Image, styles: Sequence[StyleSource],
               weights: Sequence[float] | None, alpha_c: float, max_size: int,
               content_mask: images.Source | None, style_mask: images.Source | None,
               keys: Sequence[str | None], tile: TileOption, side: int,
               progress: tiled.Progress | None) -> np.ndarray:
        """Exact tiled inference (capvst/model/tiled.py) with tiles of interior ``side``."""
        net, dtype = self.net, self.transform_dtype
        width, height = c_img.size
        ls, channels = net.config.latent_stride, net.config.latent_channels
        _, on_disk = self._plan(height, width, self.budget())
        pixels = np.asarray(c_img)
        n = tiled.tile_count(height, width, side)
        total = 2 * n
        store = tiled.LatentStore(channels, height // ls, width // ls, on_disk)
        try:
            if content_mask is not None and style_mask is not None:
                s0 = styles[0]
                s_img = images.resize(s0() if callable(s0) else s0, max_size)
                c_mask = images.decode_mask(content_mask, c_img.size)
                s_mask = images.decode_mask(style_mask, s_img.size)
                c_lab = _labels_at(c_mask, height // ls, width // ls)
                s_lab = _labels_at(s_mask, s_img.size[1] // ls, s_img.size[0] // ls)
                s_side = max(side, tiled.MIN_TILE)
                total += tiled.tile_count(s_img.size[1], s_img.size[0], s_side)
                with self._lock, self._memory_policy("encoding in tiles"):
                    c_acc = tiled.encode(net, pixels, side, labels=c_lab, store=store,
                                         progress=progress, total=total)
                    s_acc = tiled.encode(net, np.asarray(s_img), s_side, labels=s_lab,
                                         progress=progress, done=n, total=total)
                done = total - n
                with self._memory_policy("transforming"):
                    affine = tiled.Affine(tiled.label_maps(c_mask, s_mask, c_acc, s_acc,
                                                           alpha_c, dtype), c_lab)
            else:
                stats = [self.style_moments(s, max_size, k, tile) for s, k in zip(styles, keys)]
                with self._lock, self._memory_policy("encoding in tiles"):
                    c_acc = tiled.encode(net, pixels, side, store=store, progress=progress,
                                         total=total)
                done = n
                with self._memory_policy("transforming"):
                    a, b = cwct.affine_map(c_acc[-1].moments(), stats, weights, alpha_c)
                    affine = tiled.Affine({-1: (a.to(dtype), b.to(dtype))})
            with self._lock, self._memory_policy("decoding in tiles"):
                return tiled.decode(net, store, affine, height, width, side,
                                    progress=progress, done=done, total=total)
        finally:
            store.close()


def _labels_at(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map resized (nearest) to the latent's size, as the masked transform does."""
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST))
