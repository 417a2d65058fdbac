"""The closed-form Matting Laplacian (Levin, Lischinski and Weiss) and its loss.

The convention is the one CAP-VSTNet's training code uses (after PhotoWCT): the image is
scaled to [0, 1]; a window of side ``2·win_rad + 1`` is centred on every pixel at least
``win_rad`` pixels from the border (windows never leave the image, so border pixels belong
to fewer windows); each window contributes the affinity
``(1 + (I_i - μ)ᵀ (Σ + ε/|w|·I)⁻¹ (I_j - μ)) / |w|`` to every pixel pair (i, j) in it, with
``Σ`` the window's biased (divide by |w|) colour covariance; ``L = diag(row sums) - W``.

The authors scatter one value per window and pixel pair into a COO matrix and let scipy sum
the duplicates. Here the same sum is taken over shifted arrays, one per pair of positions in
the window, straight into a banded layout that is already in CSR order: the same numbers, no
sort, and no Python loop over pixels.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse
from PIL import Image

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: The authors' default regularisation of the window covariance.
DEFAULT_EPS = 1e-7


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels (0..255), got {arr.dtype}")
    return arr


def matting_laplacian(image: np.ndarray | Image.Image, eps: float = DEFAULT_EPS,
                      win_rad: int = 1) -> scipy.sparse.csr_matrix:
    """The (H·W)×(H·W) Matting Laplacian of an H×W×3 uint8 image (or a PIL image), float64.

    Pixel ``(y, x)`` is row ``y·W + x``. Training casts it to float32, as the authors do.
    """
    if win_rad < 1:
        raise ValueError(f"win_rad must be at least 1, got {win_rad}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    # channels first: every per-window quantity below is a [ch, cw] plane, contiguous
    img = _as_rgb_array(image).transpose(2, 0, 1).astype(np.float64) / 255.0
    _, h, w = img.shape
    diam = 2 * win_rad + 1
    if h < diam or w < diam:
        raise ValueError(f"a {w}x{h} image is smaller than one {diam}x{diam} window")
    area = diam * diam
    ch, cw = h - 2 * win_rad, w - 2 * win_rad  # windows, indexed by their top-left pixel
    pos = [(a // diam, a % diam) for a in range(area)]  # positions in a window, row-major

    # pixel at position a of every window: shifted views of the image, [3, ch, cw]
    at = [img[:, ay:ay + ch, ax:ax + cw] for ay, ax in pos]
    mu = np.zeros((3, ch, cw))
    second = np.zeros((3, 3, ch, cw))
    for p in at:
        mu += p
        second += p[:, None] * p[None, :]
    mu /= area
    # biased window covariance plus eps/|w| (the authors' E[I Iᵀ] - μ μᵀ), inverted in
    # closed form: a symmetric 3×3 matrix per window
    cov = second / area - mu[:, None] * mu[None, :]
    cov[[0, 1, 2], [0, 1, 2]] += eps / area
    a00, a01, a02, a11, a12, a22 = cov[0, 0], cov[0, 1], cov[0, 2], cov[1, 1], cov[1, 2], cov[2, 2]
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    det = a00 * c00 + a01 * c01 + a02 * c02
    inv = np.stack([np.stack([c00, c01, c02]),
                    np.stack([c01, a00 * a22 - a02 * a02, a01 * a02 - a00 * a12]),
                    np.stack([c02, a01 * a02 - a00 * a12, a00 * a11 - a01 * a01])]) / det
    centred = [p - mu for p in at]
    projected = [np.einsum("ijyx,jyx->iyx", inv, c) for c in centred]  # Σ⁻¹ (I_a - μ)

    # W in a banded layout: band[o, y, x] is the affinity between pixel (y, x) and the pixel
    # at offset o = (dy, dx), |dy|, |dx| <= 2·win_rad, offsets in row-major order. A window
    # adds (1 + (I_a - μ)ᵀ Σ⁻¹ (I_b - μ)) / |w| to the pair of its positions a and b, in both
    # directions (the affinity is symmetric).
    span = 2 * diam - 1
    band = np.zeros((span * span, h, w))
    for a, (ay, ax) in enumerate(pos):
        for b in range(a, area):
            by, bx = pos[b]
            value = np.einsum("iyx,iyx->yx", projected[a], centred[b])
            value += 1.0
            value /= area
            band[(by - ay + diam - 1) * span + (bx - ax + diam - 1),
                 ay:ay + ch, ax:ax + cw] += value
            if b != a:
                band[(ay - by + diam - 1) * span + (ax - bx + diam - 1),
                     by:by + ch, bx:bx + cw] += value

    centre = (diam - 1) * span + (diam - 1)
    diag = band.sum(axis=0)
    band *= -1.0
    band[centre] += diag
    return _to_csr(band, _covered(h, w, win_rad), h, w, diam)


@functools.lru_cache(maxsize=8)
def _covered(h: int, w: int, win_rad: int) -> np.ndarray:
    """Which (pixel, offset) pairs share a window: the sparsity pattern, [h·w, offsets]."""
    diam = 2 * win_rad + 1
    span = 2 * diam - 1
    ch, cw = h - 2 * win_rad, w - 2 * win_rad
    covered = np.zeros((span * span, h, w), dtype=bool)
    for ay, ax in itertools.product(range(diam), repeat=2):
        for by, bx in itertools.product(range(diam), repeat=2):
            covered[(by - ay + diam - 1) * span + (bx - ax + diam - 1),
                    ay:ay + ch, ax:ax + cw] = True
    out = np.ascontiguousarray(covered.reshape(span * span, h * w).T)
    out.flags.writeable = False
    return out


def _to_csr(band: np.ndarray, keep: np.ndarray, h: int, w: int, diam: int
            ) -> scipy.sparse.csr_matrix:
    """CSR from the banded layout: row (y, x) has columns (y + dy)·W + (x + dx), increasing
    with the offset index, so no sorting is needed."""
    span = 2 * diam - 1
    offs = np.arange(span) - (diam - 1)
    step = (np.repeat(offs, span) * w + np.tile(offs, span)).astype(np.int64)
    rows = band.reshape(span * span, h * w).T
    cols = np.arange(h * w, dtype=np.int64)[:, None] + step[None, :]
    indptr = np.zeros(h * w + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return scipy.sparse.csr_matrix((rows[keep], cols[keep], indptr), shape=(h * w, h * w))


def to_torch(L: scipy.sparse.spmatrix, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """A scipy sparse matrix as a torch sparse CSR tensor (float32 unless ``dtype`` says)."""
    import torch

    csr = scipy.sparse.csr_matrix(L)
    index = torch.int32 if csr.nnz < 2**31 else torch.int64
    return csr_tensor(torch.from_numpy(csr.indptr).to(index),
                      torch.from_numpy(csr.indices).to(index),
                      torch.from_numpy(csr.data).to(dtype or torch.float32), csr.shape[0], device)


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, n: int,
               device: torch.device | str | None = None) -> Tensor:
    """An n×n torch sparse CSR tensor from its three arrays (built by :func:`to_torch` or by a
    data-loader worker), on ``device``."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow.to(device), col.to(device), values.to(device),
                                       size=(n, n), check_invariants=False)


def laplacian_loss(image_chw: Tensor, L: Tensor | scipy.sparse.spmatrix) -> tuple[Tensor, Tensor]:
    """Matting Laplacian loss of one ``[C, H, W]`` image and its gradient, as the authors
    compute them: ``Σ_c v_cᵀ L v_c / (H·W)`` with ``v_c`` channel c flattened, and its gradient
    ``2 L v_c / (H·W)`` (L is symmetric). Nothing is tracked by autograd: training feeds the
    (scaled, clamped) gradient straight into the image's backward pass.
    """
    import torch

    if image_chw.dim() != 3:
        raise ValueError(f"expected a [C, H, W] image, got shape {tuple(image_chw.shape)}")
    c, h, w = image_chw.shape
    if not isinstance(L, torch.Tensor):
        L = to_torch(L, dtype=image_chw.dtype, device=image_chw.device)
    if tuple(L.shape) != (h * w, h * w):
        raise ValueError(f"a Laplacian of shape {tuple(L.shape)} does not fit a {w}x{h} image")
    with torch.no_grad():
        v = image_chw.detach().reshape(c, h * w).T.to(L.dtype)  # [HW, C]
        lv = (L @ v) / (h * w)
        loss = (v * lv).sum()
        grad = (2.0 * lv).T.reshape(c, h, w).to(image_chw.dtype)
    return loss.to(image_chw.dtype), grad
