"""Exact tiled inference: any image size in bounded memory, the same result as one pass.

The network is convolutional with a finite reach (:func:`forward_reach`, :func:`inverse_reach`)
and cWCT needs only global statistics of the latent. So:

1. encode overlapping tiles, each with a halo at least as wide as the forward reach, so every
   latent position of a tile's interior equals the untiled latent; accumulate the latent's mean
   and covariance (float64, Chan's pairwise merge) from interiors only, and keep the interiors
   in a :class:`LatentStore` (memory, or a temporary file when they do not fit the budget);
2. turn the global statistics into the affine map ``z -> A z + b`` that cWCT applies;
3. decode tile by tile, reading each tile's latent with a halo at least as wide as the inverse
   reach, and keep only the interior pixels.

Tile borders (interior and outer) fall on multiples of the network's side multiple (4 pixels),
so the squeeze grids of a tile and of the whole image coincide. Where a tile meets the image
edge it uses the image edge, whose reflection padding is the untiled one.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..memory import IMAGE_BYTES_PER_PIXEL, release_freed
from . import cwct
from .revnet import RevBlock, RevNet

#: ``progress(done, total)`` after each tile.
Progress = Callable[[int, int], None]
#: Latent positions per float64 chunk when accumulating statistics (bounds that memory).
STATS_CHUNK = 1 << 16
#: Smallest interior side the automatic choice goes down to.
MIN_TILE = 64


# -- reach of the network, from its modules -------------------------------------------------
def _f_reach(block: RevBlock, reach: int, scale: int) -> tuple[int, int]:
    """Reach and scale of ``F(x)`` for an input of the given reach at ``scale`` pixels."""
    for conv in block.conv:
        if isinstance(conv, nn.Conv2d):
            pad = (conv.kernel_size[0] - 1) // 2 * conv.dilation[0]
            reach += pad * scale  # neighbours read at the input's scale
            scale *= conv.stride[0]
    return reach, scale


def forward_reach(net: RevNet) -> int:
    """How far (pixels) beyond its own pixels a latent position of ``net(x)`` depends on x.

    Followed through the modules: a convolution with padding p at a scale of s pixels per
    position adds p·s; a squeeze adds nothing; depth-to-space from scale 2s to s adds s (a
    child cell can sit at either side of its parent). A coupling ``(x1, x2) -> (x2, x1 +
    F(x2))`` gives the pair ``(r2, max(r1, reach of F(x2)))``.
    """
    r1 = r2 = 0
    scale = 1
    blocks = [*net.stack, *net.channel_reduction.block_list]
    for block in blocks:
        f, out_scale = _f_reach(block, r2, scale)
        r1, r2 = r2, max(r1, f)
        scale = out_scale
    reach = max(r1, r2)
    for _ in range(net.channel_reduction.sp_steps):
        scale //= 2
        reach += scale
    return reach


def inverse_reach(net: RevNet) -> int:
    """How far (pixels) beyond a pixel of ``net.inverse(z)`` the latent it depends on lies.

    The same rules, followed through the inverse: squeeze the latent, undo the couplings in
    reverse (``x1 = y1 - F(x2)``, with ``x2`` and ``x1`` unsqueezed by stride-2 blocks).
    """
    scale = net.config.latent_stride
    for _ in range(net.channel_reduction.sp_steps):
        scale *= 2
    a = b = 0  # reaches of (x2, y1), the pair a block's inverse takes
    blocks = [*net.stack, *net.channel_reduction.block_list]
    for block in reversed(blocks):
        if block.stride == 2:
            scale //= 2
            a += scale  # unsqueeze of x2
        f, _ = _f_reach(block, a, scale)
        x1 = max(b, f) + (scale if block.stride == 2 else 0)
        a, b = x1, a  # the pair (x1, x2) is the previous block's (x2, y1)
    return max(a, b)


def halo(net: RevNet) -> int:
    """Halo (pixels, a multiple of the side multiple) that makes tiles exact both ways."""
    m = net.config.side_multiple
    r = max(forward_reach(net), inverse_reach(net))
    return -(-r // m) * m


# -- tiles -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """Interior ``[y0, y1) × [x0, x1)`` and outer (with halo) ``[oy0, oy1) × [ox0, ox1)``."""

    y0: int
    y1: int
    x0: int
    x1: int
    oy0: int
    oy1: int
    ox0: int
    ox1: int


def tiles(height: int, width: int, side: int, margin: int) -> list[Tile]:
    """Tiles of interior ``side`` covering the image, row by row, with ``margin`` of halo."""
    out = []
    for y0 in range(0, height, side):
        y1 = min(y0 + side, height)
        for x0 in range(0, width, side):
            x1 = min(x0 + side, width)
            out.append(Tile(y0, y1, x0, x1, max(0, y0 - margin), min(height, y1 + margin),
                            max(0, x0 - margin), min(width, x1 + margin)))
    return out


# -- statistics ----------------------------------------------------------------------------------
class Accumulator:
    """Running mean and centred second moment of ``[C, N]`` features (float64, Chan's merge)."""

    def __init__(self, channels: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        self.n = 0
        self.mean = torch.zeros(channels, dtype=dtype, device=device)
        self.m2 = torch.zeros(channels, channels, dtype=dtype, device=device)

    def add(self, feat: Tensor) -> None:
        """Add the columns of ``feat`` ``[C, N]``."""
        for s in range(0, feat.shape[1], STATS_CHUNK):
            chunk = feat[:, s:s + STATS_CHUNK].to(self.mean.dtype)
            nb = chunk.shape[1]
            if nb == 0:
                continue
            mb = chunk.mean(dim=1)
            c = chunk - mb[:, None]
            m2b = c @ c.T
            n = self.n + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
            self.n = n

    def moments(self) -> cwct.Moments:
        """Mean and Cholesky factor of the covariance (divisor N − 1, as cWCT)."""
        if self.n < 2:
            raise ModelError("a covariance needs at least two feature positions")
        return cwct.Moments(self.mean, cwct.cholesky_factor(self.m2 / (self.n - 1)))


# -- latent storage -------------------------------------------------------------------------------
class LatentStore:
    """The whole latent ``[C, H, W]`` float32, in memory or in a temporary file.

    Both keep it channels-last (rows of ``W × C``): :meth:`read` fills one fresh buffer and
    returns a ``[C, h, w]`` view of it, which the channels-last network and the in-place
    transform use without another copy. The file is read and written with ordinary positioned
    I/O, so its pages live in the OS cache, not in this process's memory.
    """

    def __init__(self, channels: int, height: int, width: int, on_disk: bool,
                 folder: str | None = None) -> None:
        self.shape = (channels, height, width)
        self.on_disk = on_disk
        self._mem: np.ndarray | None = None
        self._fd: int | None = None
        if on_disk:
            fd, path = tempfile.mkstemp(prefix="capvst-latent-", suffix=".f32", dir=folder)
            os.unlink(path)  # gone with the descriptor, whatever happens
            os.ftruncate(fd, channels * height * width * 4)
            self._fd = fd
        else:
            self._mem = np.empty((height, width, channels), dtype=np.float32)

    @staticmethod
    def nbytes(channels: int, height: int, width: int) -> int:
        """Bytes of a latent of this shape."""
        return channels * height * width * 4

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Store ``block`` ``[C, h, w]`` at latent position (y0, x0)."""
        c, h, w = block.shape
        if self._mem is not None:
            self._mem[y0:y0 + h, x0:x0 + w] = block.transpose(1, 2, 0)
            return
        assert self._fd is not None
        rows = np.ascontiguousarray(block.transpose(1, 2, 0))  # h, w, C
        row_bytes = self.shape[2] * c * 4
        for i in range(h):
            os.pwrite(self._fd, rows[i].tobytes(), (y0 + i) * row_bytes + x0 * c * 4)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The latent ``[C, y1 - y0, x1 - x0]``: a view of a fresh channels-last buffer."""
        if self._mem is not None:
            return self._mem[y0:y1, x0:x1].copy().transpose(2, 0, 1)
        assert self._fd is not None
        c, _, width = self.shape
        h, w = y1 - y0, x1 - x0
        out = np.empty((h, w, c), dtype=np.float32)
        row_bytes = width * c * 4
        for i in range(h):
            os.preadv(self._fd, [memoryview(out[i]).cast("B")], (y0 + i) * row_bytes + x0 * c * 4)
        return out.transpose(2, 0, 1)

    def close(self) -> None:
        """Free the memory or the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mem = None


# -- the passes ---------------------------------------------------------------------------------
@contextmanager
def nchw(net: RevNet) -> Iterator[None]:
    """Run tiles with NCHW activations. Channels-last passes are faster on CPUs, but oneDNN
    keeps per-shape buffers for them (0.3–0.4 GB after a few tile shapes of about 1100
    pixels) and peaks higher (807 against 663 bytes per pixel at 1024×1024): the memory
    budget's arithmetic (``memory.ACTIVATION_BYTES_PER_PIXEL``) holds for NCHW."""
    saved = net.channels_last
    net.channels_last = False
    try:
        yield
    finally:
        net.channels_last = saved


def _pixels_tensor(pixels: np.ndarray, t: Tile, device: torch.device) -> Tensor:
    block = pixels[t.oy0:t.oy1, t.ox0:t.ox1]
    x = torch.from_numpy(np.array(block)).permute(2, 0, 1).float().div(255)
    return x.unsqueeze(0).to(device)


def encode(net: RevNet, pixels: np.ndarray, side: int, *,
           labels: np.ndarray | None = None, store: LatentStore | None = None,
           dtype: torch.dtype = torch.float64, progress: Progress | None = None,
           done: int = 0, total: int | None = None) -> dict[int, Accumulator]:
    """Encode HWC uint8 ``pixels`` tile by tile; statistics of the interiors.

    Returns one accumulator under key ``-1`` for the whole latent, or with ``labels`` (a label
    map at latent size) one per label present. Interiors go to ``store`` when given.
    """
    height, width = pixels.shape[:2]
    net.check_size(height, width)
    ls = net.config.latent_stride
    margin = halo(net)
    device = next(net.parameters()).device
    grid = tiles(height, width, side, margin)
    total = total if total is not None else len(grid)
    acc: dict[int, Accumulator] = {}
    channels = net.config.latent_channels
    for n, t in enumerate(grid, 1):
        with torch.inference_mode(), nchw(net):
            z = net(_pixels_tensor(pixels, t, device))[0]
            z = z[:, (t.y0 - t.oy0) // ls:(t.y1 - t.oy0) // ls,
                  (t.x0 - t.ox0) // ls:(t.x1 - t.ox0) // ls]
            feat = z.reshape(channels, -1)
            if labels is None:
                acc.setdefault(-1, Accumulator(channels, device, dtype)).add(feat)
            else:
                lab = labels[t.y0 // ls:t.y1 // ls, t.x0 // ls:t.x1 // ls].reshape(-1)
                for label in np.unique(lab).tolist():
                    sel = torch.from_numpy(np.flatnonzero(lab == label)).to(device)
                    acc.setdefault(int(label), Accumulator(channels, device, dtype)).add(
                        feat.index_select(1, sel))
            if store is not None:
                store.write(t.y0 // ls, t.x0 // ls, z.float().cpu().numpy())
        del z, feat
        release_freed()
        if progress is not None:
            progress(done + n, total)
    return acc


@dataclass(frozen=True)
class Affine:
    """The transform as ``z -> A z + b``, globally or per label (others keep their values)."""

    maps: dict[int, tuple[Tensor, Tensor]]
    labels: np.ndarray | None = None  # label map at latent size; None: key -1 everywhere

    def apply(self, z: Tensor, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Transform the latent window ``z`` ``[C, h, w]`` at (y0.., x0..) in place and return
        it. A ``z`` stored channels-last (as :meth:`LatentStore.read` gives it) is used as is;
        any other is copied to that layout first."""
        c = z.shape[0]
        if not z.permute(1, 2, 0).is_contiguous():  # make it channels-last (one copy)
            z = z.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        feat = z.permute(1, 2, 0).view(-1, c)  # a view: pixels × channels
        lab = None if self.labels is None else self.labels[y0:y1, x0:x1].reshape(-1)
        for label, (a, b) in self.maps.items():
            if lab is None:
                idx = None
            else:
                found = np.flatnonzero(lab == label)
                if found.size == 0:
                    continue
                idx = torch.from_numpy(found).to(z.device)
            count = feat.shape[0] if idx is None else idx.numel()
            # in chunks: float64 copies of a whole tile would dwarf the tile itself
            for s in range(0, count, STATS_CHUNK):
                if idx is None:
                    rows = feat[s:s + STATS_CHUNK]
                    rows.copy_(torch.addmm(b, rows.to(a.dtype), a.T))
                else:
                    sel = idx[s:s + STATS_CHUNK]
                    part = torch.addmm(b, feat.index_select(0, sel).to(a.dtype), a.T)
                    feat.index_copy_(0, sel, part.to(feat.dtype))
        return z


def decode(net: RevNet, store: LatentStore, affine: Affine, height: int, width: int,
           side: int, *, progress: Progress | None = None, done: int = 0,
           total: int | None = None) -> np.ndarray:
    """Transform and decode the stored latent tile by tile; HWC uint8 pixels out."""
    from .. import images

    ls = net.config.latent_stride
    margin = halo(net)
    device = next(net.parameters()).device
    grid = tiles(height, width, side, margin)
    total = total if total is not None else len(grid)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for n, t in enumerate(grid, 1):
        ly0, ly1, lx0, lx1 = t.oy0 // ls, t.oy1 // ls, t.ox0 // ls, t.ox1 // ls
        with torch.inference_mode(), nchw(net):
            z = torch.from_numpy(store.read(ly0, ly1, lx0, lx1)).to(device)
            z = affine.apply(z, ly0, ly1, lx0, lx1)
            x = net.inverse(z.unsqueeze(0))
            x = x[:, :, t.y0 - t.oy0:t.y1 - t.oy0, t.x0 - t.ox0:t.x1 - t.ox0]
            out[t.y0:t.y1, t.x0:t.x1] = images.to_uint8(x)
        del z, x
        release_freed()
        if progress is not None:
            progress(done + n, total)
    return out


def plan(height: int, width: int, budget: int, margin: int, activation_bytes: int,
         latent_bytes: int) -> tuple[int, bool]:
    """Interior side and whether the latent goes to disk, for a memory ``budget`` in bytes.

    ``activation_bytes`` is the peak per pixel of one tile's pass, ``latent_bytes`` the stored
    latent per pixel. The side is the largest multiple of 4 whose tile (with halo) fits what
    the image buffers and the latent leave. The latent stays in memory unless that would
    shrink the tiles below both the side a disk-backed latent allows and four halos (where
    recomputed halos start to cost more than the file's I/O).
    """
    buffers = IMAGE_BYTES_PER_PIXEL * height * width  # the content's pixels and the output's
    longest = -(-max(height, width) // 4) * 4

    def side_for(left: int) -> int:
        outer = int(math.sqrt(max(left, 0) / activation_bytes))
        return min(longest, max(MIN_TILE, (outer - 2 * margin) // 4 * 4))

    on_disk = side_for(budget - buffers)
    in_memory = side_for(budget - buffers - latent_bytes * height * width)
    if in_memory >= min(on_disk, 4 * margin):
        return in_memory, False
    return on_disk, True


def tile_count(height: int, width: int, side: int) -> int:
    """Number of tiles of interior ``side`` for an image of this size."""
    return math.ceil(height / side) * math.ceil(width / side)


def label_maps(content_labels: np.ndarray, style_labels: np.ndarray,
               content_acc: dict[int, Accumulator], style_acc: dict[int, Accumulator],
               alpha_c: float, dtype: torch.dtype = torch.float64) -> dict[int, tuple[Tensor,
                                                                                      Tensor]]:
    """Per-label affine maps of the masked transform, by the original's label rules.

    ``content_labels`` and ``style_labels`` are the masks at image size (for the selection).
    """
    maps = {}
    for label in cwct.label_selection(content_labels, style_labels):
        c, s = content_acc.get(label), style_acc.get(label)
        if c is None or s is None or c.n < 2 or s.n < 2:
            continue
        maps[label] = cwct.affine_map(c.moments(), [s.moments()], None, alpha_c)
        maps[label] = (maps[label][0].to(dtype), maps[label][1].to(dtype))
    return maps


def image_moments(net: RevNet, pixels: np.ndarray, side: int,
                  dtype: torch.dtype = torch.float64) -> cwct.Moments:
    """Latent statistics of a whole image (a style), tiled; nothing else is kept."""
    return encode(net, pixels, side, dtype=dtype)[-1].moments()


__all__ = ["Accumulator", "Affine", "LatentStore", "MIN_TILE", "Progress", "Tile", "decode",
           "encode", "forward_reach", "halo", "image_moments", "inverse_reach", "label_maps",
           "nchw", "tile_count", "tiles"]

