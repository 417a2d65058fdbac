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


#: Opt-in reduced precisions of the network (``CAPVST_PRECISION``); docs/PERFORMANCE.md
#: gives each one's measured error against ``float32``.
PRECISIONS = ("float32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_numerics(device: torch.device, precision: str = "float32") -> None:
    """Make the device's float32 numerics explicit: TF32 (matmul and cuDNN) only when asked.

    PyTorch lets cuDNN use TF32 by default, which would move GPU results away from the
    reference; these are process-wide switches, and a worker process serves one precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        return
    tf32 = precision == "tf32"
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        # the newer switches; mixing them with allow_tf32 is refused by some releases
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
        state = f"matmul {matmul.fp32_precision}, cudnn conv {cudnn.conv.fp32_precision}"
    else:
        matmul.allow_tf32 = tf32
        cudnn.allow_tf32 = tf32
        state = f"matmul tf32 {matmul.allow_tf32}, cudnn tf32 {cudnn.allow_tf32}"
    cudnn.benchmark = False  # the same algorithms run to run: the same pixels
    log.info("float32 numerics on %s: %s (precision %s)", device, state, precision)


def default_channels_last(device: torch.device, precision: str = "float32") -> bool:
    """Channels-last activations where they are faster: on CPUs (oneDNN's convolutions run
    about a fifth faster, measured in docs/PERFORMANCE.md) and for half precisions on GPUs
    (tensor-core convolutions work channels-last). The values agree within float rounding."""
    return device.type == "cpu" or precision in _AUTOCAST


StyleKey = tuple[str | None, ...]


class Stylizer:
    """Holds one network on one device and caches style statistics by key.

    Thread-safe for the cache; model calls are serialised by a lock so one process never runs
    two forward passes on the same device at once. ``transform_dtype`` is the precision of the
    transform's large passes (its small factorisations are always float64); ``precision``
    the network's (``float32`` unless opted in to a faster one). ``channels_last`` runs the
    network's activations channels-last (None: where measured faster, see
    :func:`default_channels_last`); ``compile`` wraps the whole-image passes in
    ``torch.compile`` (opt-in: ``CAPVST_COMPILE``).
    """

    def __init__(self, model: LoadedModel, device: str | torch.device = "auto",
                 transform_dtype: torch.dtype = torch.float64, style_cache_size: int = 64,
                 memory_budget: int | None = None, precision: str = "float32",
                 channels_last: bool | None = None, compile: bool = False) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        set_numerics(self.device, precision)
        if self.device.type == "cpu":
            memory.tune_cpu_allocator()
        self.precision = precision
        self.net = model.net.to(self.device)
        self.net.channels_last = default_channels_last(self.device, precision) \
            if channels_last is None else channels_last
        #: compiled whole-image passes when asked (tiles run the plain network)
        self._compiled: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = \
            (torch.compile(self.net.forward), torch.compile(self.net.inverse)) if compile \
            else None
        self.mode: Mode = model.mode
        self.model_id = model.model_id
        self.transform_dtype = transform_dtype
        self.style_cache_size = style_cache_size
        #: Bytes one stylization may use (``CAPVST_MEMORY_BUDGET``); None: a share of what the
        #: device has free at the time.
        self.memory_budget = memory_budget
        self._cache: OrderedDict[tuple[str | int | None, ...],
                                 cwct.Moments | cwct.LabelMoments] = OrderedDict()
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

    @contextmanager
    def _numerics(self) -> Iterator[None]:
        dtype = _AUTOCAST.get(self.precision)
        if dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=dtype):
                yield

    def forward(self, x: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` (float32) of a batch of images ``[B, 3, H, W]``."""
        with self._lock, torch.inference_mode(), self._memory_policy("encoding"), \
                self._numerics():
            encode = self._compiled[0] if self._compiled else self.net
            return encode(x.to(self.device)).float()

    def inverse(self, z: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` (float32, not clamped) of a batch of latents."""
        with self._lock, torch.inference_mode(), self._memory_policy("decoding"), \
                self._numerics():
            decode = self._compiled[1] if self._compiled else self.net.inverse
            return decode(z).float()

    def encode(self, img: Image.Image) -> Tensor:
        """Latent of an already resized RGB image."""
        return self.forward(images.to_tensor(img))

    def decode(self, latent: Tensor) -> np.ndarray:
        """8-bit HWC pixels of a latent (the original's clamp and truncation)."""
        return images.to_uint8(self.inverse(latent))

    def _cached(self, ck: tuple[str | int | None, ...] | None
                ) -> cwct.Moments | cwct.LabelMoments | None:
        if ck is None:
            return None
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                self.cache_hits += 1
            return hit

    def _remember(self, ck: tuple[str | int | None, ...] | None,
                  stats: cwct.Moments | cwct.LabelMoments) -> None:
        if ck is None or self.style_cache_size <= 0:
            return
        with self._lock:
            self.cache_misses += 1
            self._cache[ck] = stats
            while len(self._cache) > self.style_cache_size:
                self._cache.popitem(last=False)

    def style_moments(self, style: StyleSource, max_size: int, key: str | None = None,
                      tile: TileOption = "auto") -> cwct.Moments:
        """Statistics of a style image, from the cache when ``key`` was seen at this size.

        ``key`` must name the style's content exactly (the workers use URI and ETag); the
        cache is per Stylizer, that is per model. A style too large for the memory budget is
        encoded in tiles (the same statistics).
        """
        ck = (key, max_size) if key is not None else None
        hit = self._cached(ck)
        if isinstance(hit, cwct.Moments):
            return hit
        img = images.resize(style() if callable(style) else style, max_size)
        height, width = img.size[1], img.size[0]
        side = self.tile_side(height, width, tile)
        stats: cwct.Moments | None = None
        if side is None:
            try:
                latent = self.encode(img)
                with self._memory_policy("computing style statistics"):
                    stats = cwct.style_moments(latent, self.transform_dtype)
            except OutOfMemory:
                side = None if tile == "off" else self._smaller(height, width, None)
                if side is None:
                    raise
        while stats is None:
            assert side is not None
            try:
                with self._lock, self._memory_policy("computing style statistics in tiles"):
                    stats = tiled.image_moments(self.net, np.asarray(img), side,
                                                self.transform_dtype)
            except OutOfMemory:
                smaller = self._smaller(height, width, side)
                if smaller is None:
                    raise
                side = smaller
        self._remember(ck, stats)
        return stats

    def label_moments(self, style: StyleSource, style_mask: images.Source, max_size: int,
                      key: str | None = None, mask_key: str | None = None
                      ) -> cwct.LabelMoments:
        """Per-label statistics of a style under its mask, cached when both have keys."""
        ck = ("mask", key, mask_key, max_size) if key is not None and mask_key is not None \
            else None
        hit = self._cached(ck)
        if isinstance(hit, cwct.LabelMoments):
            return hit
        s_img = images.resize(style() if callable(style) else style, max_size)
        s_mask = images.decode_mask(style_mask, s_img.size)
        latent = self.encode(s_img)
        with self._memory_policy("computing style statistics"):
            stats = cwct.label_moments(latent, s_mask, self.transform_dtype)
        self._remember(ck, stats)
        return stats

    def has_style(self, key: str, max_size: int, mask_key: str | None = None) -> bool:
        """Whether statistics for ``key`` (under the mask ``mask_key``) at ``max_size`` are
        cached."""
        ck = (key, max_size) if mask_key is None else ("mask", key, mask_key, max_size)
        with self._lock:
            return ck in self._cache

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
        if memory.untiled_bytes(height, width) + memory.IMAGE_BYTES_PER_PIXEL * height * width \
                <= budget:
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
    def _checked(self, styles: Sequence[StyleSource], weights: Sequence[float] | None,
                 alpha_c: float) -> tuple[float, list[float] | None]:
        if not styles:
            raise InvalidItem("at least one style is needed")
        try:
            return cwct.check_alpha(alpha_c), cwct.check_weights(len(styles), weights)
        except ValueError as exc:
            raise InvalidItem(str(exc)) from None

    def stylize(self, content: Image.Image, styles: Sequence[StyleSource], *,
                weights: Sequence[float] | None = None, alpha_c: float = 0.0,
                max_size: int = images.DEFAULT_MAX_SIZE,
                content_mask: images.Source | None = None,
                style_mask: images.Source | None = None,
                style_keys: Sequence[str | None] | None = None,
                tile: TileOption = "auto",
                progress: tiled.Progress | None = None,
                mask_key: str | None = None) -> np.ndarray:
        """Stylize decoded RGB ``content`` with one style or a weighted mix; HWC uint8 out.

        Images are resized here by the original's rule (``max_size`` 0: full resolution).
        Masks (both or neither, one style only) switch to the per-label transform;
        ``mask_key`` names the style mask's content for the cache, as ``style_keys`` name
        the styles'. ``tile``: ``auto`` runs the image whole when it fits the memory budget
        and in exact tiles otherwise (docs/MODEL.md); ``off``; or a tile side in pixels.
        Running out of memory retries in smaller tiles unless ``tile`` is ``off``.
        ``progress(done, total)`` is called after each tile.
        """
        alpha_c, weights = self._checked(styles, weights, alpha_c)
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
                return self._whole(content, c_img, styles, weights, alpha_c, max_size,
                                   content_mask, style_mask, keys, tile, mask_key)
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

    def _whole(self, content: Image.Image, c_img: Image.Image, styles: Sequence[StyleSource],
               weights: Sequence[float] | None, alpha_c: float, max_size: int,
               content_mask: images.Source | None, style_mask: images.Source | None,
               keys: Sequence[str | None], tile: TileOption, mask_key: str | None
               ) -> np.ndarray:
        if content_mask is None or style_mask is None:
            return self.stylize_batch([content], styles, weights=weights, alpha_c=alpha_c,
                                      max_size=max_size, style_keys=keys, tile=tile)[0]
        alpha_c, weights = self._checked(styles, weights, alpha_c)
        c_mask = images.decode_mask(content_mask, c_img.size)
        stats = self.label_moments(styles[0], style_mask, max_size, keys[0], mask_key)
        z_c = self.encode(c_img)
        with self._memory_policy("transforming"), torch.inference_mode():
            z_cs = cwct.transfer_labels(z_c, c_mask, stats, alpha_c, self.transform_dtype)
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
                with self._lock, tiled.nchw(net):  # a tiled job's passes all stay NCHW
                    stats = [self.style_moments(s, max_size, k, tile)
                             for s, k in zip(styles, keys)]
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


    def stylize_batch(self, contents: Sequence[Image.Image], styles: Sequence[StyleSource], *,
                      weights: Sequence[float] | None = None, alpha_c: float = 0.0,
                      max_size: int = images.DEFAULT_MAX_SIZE,
                      style_keys: Sequence[str | None] | None = None,
                      tile: TileOption = "auto") -> list[np.ndarray]:
        """Stylize several contents with the same styles and options; HWC uint8 out, in order.

        Contents that have the same size after the resize go through the network together
        (the caller bounds how many: memory grows with the batch); the transform runs per
        image, so each output is the one :meth:`stylize` gives within float rounding.
        Errors are not per item: a caller that needs per-item results runs the items one by
        one after a failure. The contents run whole (use :meth:`stylize` for one that needs
        tiles); ``tile`` applies to the styles.
        """
        alpha_c, weights = self._checked(styles, weights, alpha_c)
        keys = list(style_keys) if style_keys is not None else [None] * len(styles)
        resized = [images.resize(c, max_size) for c in contents]
        stats = [self.style_moments(s, max_size, k, tile) for s, k in zip(styles, keys)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(resized):
            groups.setdefault(img.size, []).append(i)
        out: list[np.ndarray | None] = [None] * len(resized)
        for idx in groups.values():
            z = self.forward(torch.cat([images.to_tensor(resized[i]) for i in idx]))
            with self._memory_policy("transforming"), torch.inference_mode():
                for b in range(len(idx)):
                    z[b] = cwct.transfer(z[b], stats, weights, alpha_c, self.transform_dtype)
            y = self.inverse(z)
            for b, i in enumerate(idx):
                out[i] = images.to_uint8(y[b:b + 1])
        return [o for o in out if o is not None]


def _labels_at(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map resized (nearest) to the latent's size, as the masked transform does."""
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST))
