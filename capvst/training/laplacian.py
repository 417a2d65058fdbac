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
    img = _as_rgb_array(image).astype(np.float64) / 255.0
    h, w, _ = img.shape
    diam = 2 * win_rad + 1
    if h < diam or w < diam:
        raise ValueError(f"a {w}x{h} image is smaller than one {diam}x{diam} window")
    area = diam * diam
    ch, cw = h - 2 * win_rad, w - 2 * win_rad  # windows: top-left corner (ky, kx)

    # colours of every window, [ch, cw, area, 3], position a = (ay, ax) in row-major order
    win = np.lib.stride_tricks.sliding_window_view(img, (diam, diam), axis=(0, 1))
    win = win.transpose(0, 1, 3, 4, 2).reshape(ch, cw, area, 3)
    mu = win.mean(axis=2, keepdims=True)
    centred = win - mu
    cov = np.einsum("...ai,...aj->...ij", centred, centred) / area
    inv = np.linalg.inv(cov + (eps / area) * np.eye(3))
    # affinity of every position pair in every window, [area, area, ch, cw]
    vals = np.einsum("...ai,...ij,...bj->ab...", centred, inv, centred, optimize=True)
    vals = (1.0 + np.ascontiguousarray(vals)) / area

    # W in a banded layout: band[o, y, x] is the affinity between pixel (y, x) and the pixel
    # at offset o = (dy, dx), |dy|, |dx| <= 2·win_rad, offsets in row-major order
    span = 2 * diam - 1
    band = np.zeros((span * span, h, w))
    covered = np.zeros((span * span, h, w), dtype=bool)
    pos = [(a // diam, a % diam) for a in range(area)]
    for a, (ay, ax) in enumerate(pos):
        rows = slice(ay, ay + ch)
        cols = slice(ax, ax + cw)
        for b, (by, bx) in enumerate(pos):
            o = (by - ay + diam - 1) * span + (bx - ax + diam - 1)
            band[o, rows, cols] += vals[a, b]
            covered[o, rows, cols] = True

    centre = (diam - 1) * span + (diam - 1)
    diag = band.sum(axis=0)
    lap = -band
    lap[centre] += diag
    covered[centre] = True
    rows_lap = lap.reshape(span * span, h * w).T
    keep = covered.reshape(span * span, h * w).T

    # CSR: columns of row (y, x) are (y + dy)·W + (x + dx), increasing with o
    offs = np.arange(span) - (diam - 1)
    dy = np.repeat(offs, span)
    dx = np.tile(offs, span)
    cols_idx = np.arange(h * w)[:, None] + (dy * w + dx)[None, :]
    indptr = np.zeros(h * w + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return scipy.sparse.csr_matrix((rows_lap[keep], cols_idx[keep], indptr),
                                   shape=(h * w, h * w))


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
