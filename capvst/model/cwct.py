"""Cholesky-based whitening and colouring transform (cWCT) on CAP-VSTNet latents.

All functions take one image's latent, ``[C, H, W]`` or ``[1, C, H, W]``, and compute in
float64 unless ``dtype`` says otherwise. A float32 path is faster on GPUs without fast FP64
but it is an approximation: see docs/MODEL.md for its measured error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import ModelError

#: Diagonal loading step of the original when Cholesky fails; its n-th retry adds n·EPS.
EPS = 2e-5
#: The original retries forever; we stop after this many loads and report a model error.
MAX_REGULARISATION_STEPS = 200
#: Label rules of the original for semantic masks.
MIN_LABEL_PIXELS = 10
MAX_LABEL_RATIO = 100.0


@dataclass(frozen=True)
class Moments:
    """Mean ``[C]`` and lower Cholesky factor ``[C, C]`` of a feature covariance."""

    mean: Tensor
    factor: Tensor


def _flatten(latent: Tensor, dtype: torch.dtype) -> Tensor:
    if latent.dim() == 4:
        if latent.shape[0] != 1:
            raise ValueError("cWCT works on one image at a time")
        latent = latent[0]
    if latent.dim() != 3:
        raise ValueError(f"expected a [C, H, W] latent, got shape {tuple(latent.shape)}")
    return latent.reshape(latent.shape[0], -1).to(dtype)


def cholesky_factor(cov: Tensor) -> Tensor:
    """Lower Cholesky factor of ``cov``, loading the diagonal as the original does if needed.

    The original adds ``EPS·I`` then ``2·EPS·I`` and so on (cumulatively, with the step rounded
    to float32) until the factorisation succeeds; that never ends for a non-finite matrix.
    We do the same for at most :data:`MAX_REGULARISATION_STEPS` steps, then raise.
    """
    if not bool(torch.isfinite(cov).all()):
        raise ModelError("feature covariance is not finite (the input produced NaN or inf)")
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return factor
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    step = 0.0
    for _ in range(MAX_REGULARISATION_STEPS):
        step += EPS
        # float32 rounding of the step, as in the original (float32 identity times a float)
        cov = cov + eye * float(np.float32(step))
        factor, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0:
            return factor
    raise ModelError(
        f"feature covariance is not positive definite after {MAX_REGULARISATION_STEPS} "
        "regularisation steps"
    )


def moments(feat: Tensor) -> tuple[Moments, Tensor]:
    """Moments of ``feat`` ``[C, N]`` and the centred features."""
    if feat.shape[1] < 2:
        raise ModelError("a covariance needs at least two feature positions")
    mean = feat.mean(dim=1)
    centred = feat - mean[:, None]
    cov = (centred @ centred.T) / (feat.shape[1] - 1)
    return Moments(mean, cholesky_factor(cov)), centred


def style_moments(latent: Tensor, dtype: torch.dtype = torch.float64) -> Moments:
    """Statistics of a style latent; cache and reuse them across contents."""
    return moments(_flatten(latent, dtype))[0]


def _colour(feat: Tensor, styles: Sequence[Moments], weights: Sequence[float] | None,
            alpha_c: float) -> Tensor:
    """Whiten ``feat`` ``[C, N]`` with its own factor and colour with the (mixed) style."""
    own, centred = moments(feat)
    inv_own = torch.linalg.inv(own.factor)
    white = inv_own @ centred
    if len(styles) == 1 and alpha_c == 0.0 and weights is None:
        factor, mean = styles[0].factor, styles[0].mean
    else:
        w = [1.0] * len(styles) if weights is None else list(weights)
        factor = torch.zeros_like(own.factor)
        mean = torch.zeros_like(own.mean)
        for s, ws in zip(styles, w):
            factor = factor + s.factor * ws
            mean = mean + s.mean * ws
        # towards the content's own statistics; the original re-inverts the inverse
        factor = factor * (1 - alpha_c) + torch.linalg.inv(inv_own) * alpha_c
        mean = mean * (1 - alpha_c) + own.mean * alpha_c
    return factor @ white + mean[:, None]


def check_weights(n_styles: int, weights: Sequence[float] | None) -> list[float] | None:
    """Validate style weights; normalise them to sum 1 when they do not already."""
    if weights is None:
        return None if n_styles == 1 else [1.0 / n_styles] * n_styles
    w = [float(x) for x in weights]
    if len(w) != n_styles:
        raise ValueError(f"{len(w)} style weights for {n_styles} styles")
    if any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError("style weights must be non-negative with a positive sum")
    total = sum(w)
    if abs(total - 1.0) > 1e-9:
        w = [x / total for x in w]
    return w


def check_alpha(alpha_c: float) -> float:
    """``alpha_c`` must lie in [0, 1]."""
    a = float(alpha_c)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha_c must be between 0 and 1, got {alpha_c}")
    return a


def transfer(content: Tensor, styles: Sequence[Moments], weights: Sequence[float] | None = None,
             alpha_c: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """cWCT of a content latent towards one style or a weighted mix of styles.

    With one style and ``alpha_c == 0`` this is the plain transform; otherwise the
    interpolation form, where ``alpha_c`` blends towards the content's own statistics.
    Returns a latent of the content's shape and dtype.
    """
    if not styles:
        raise ValueError("at least one style is needed")
    alpha_c = check_alpha(alpha_c)
    w = check_weights(len(styles), weights)
    feat = _flatten(content, dtype)
    for s in styles:
        if s.mean.shape[0] != feat.shape[0]:
            raise ValueError("style statistics come from another network configuration")
    out = _colour(feat, [Moments(s.mean.to(dtype), s.factor.to(dtype)) for s in styles], w, alpha_c)
    return out.to(content.dtype).reshape(content.shape)


def label_selection(content_mask: np.ndarray, style_mask: np.ndarray) -> list[int]:
    """Labels taking part in a masked transfer, by the original's rules at image size."""
    c_labels, c_counts = np.unique(content_mask, return_counts=True)
    s_count = dict(zip(*np.unique(style_mask, return_counts=True)))
    chosen = []
    for label, a in zip(c_labels.tolist(), c_counts.tolist()):
        b = int(s_count.get(label, 0))
        if a > MIN_LABEL_PIXELS and b > MIN_LABEL_PIXELS and a / b < MAX_LABEL_RATIO \
                and b / a < MAX_LABEL_RATIO:
            chosen.append(int(label))
    return chosen


def _resize_labels(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.reshape(-1)
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)).reshape(-1)


def transfer_masked(content: Tensor, style: Tensor, content_mask: np.ndarray,
                    style_mask: np.ndarray, alpha_c: float = 0.0,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-label cWCT: each label of the content takes the statistics of the same label in
    the style. Masks are 2-D uint8 label maps at image size; labels that do not take part, or
    that shrink to fewer than two latent positions, keep the content's latent values.
    """
    alpha_c = check_alpha(alpha_c)
    if content_mask.ndim != 2 or style_mask.ndim != 2:
        raise ValueError("masks must be 2-D label maps")
    c_feat = _flatten(content, dtype)
    s_feat = _flatten(style, dtype)
    ch, cw = content.shape[-2:]
    sh, sw = style.shape[-2:]
    c_lab = _resize_labels(content_mask, ch, cw)
    s_lab = _resize_labels(style_mask, sh, sw)
    out = c_feat.clone()
    for label in label_selection(content_mask, style_mask):
        c_idx = np.flatnonzero(c_lab == label)
        s_idx = np.flatnonzero(s_lab == label)
        if c_idx.size < 2 or s_idx.size < 2:
            continue
        c_sel = torch.from_numpy(c_idx).to(c_feat.device)
        s_sel = torch.from_numpy(s_idx).to(s_feat.device)
        style_stats = moments(s_feat.index_select(1, s_sel))[0]
        out[:, c_sel] = _colour(c_feat.index_select(1, c_sel), [style_stats], None, alpha_c)
    return out.to(content.dtype).reshape(content.shape)


def affine_map(own: Moments, styles: Sequence[Moments], weights: Sequence[float] | None,
               alpha_c: float) -> tuple[Tensor, Tensor]:
    """The transform of a content with statistics ``own`` as ``A @ feat + b[:, None]``.

    ``A`` ``[C, C]`` and ``b`` ``[C]`` in float64: what :func:`transfer` computes, for a
    latent too large to hold at once (tiles share one map).
    """
    if not styles:
        raise ValueError("at least one style is needed")
    alpha_c = check_alpha(alpha_c)
    w = check_weights(len(styles), weights)
    f64 = torch.float64
    inv_own = torch.linalg.inv(own.factor.to(f64))
    own_mean = own.mean.to(f64)
    if len(styles) == 1 and alpha_c == 0.0 and w is None:
        factor, mean = styles[0].factor.to(f64), styles[0].mean.to(f64)
    else:
        ws = [1.0] * len(styles) if w is None else w
        factor = sum((s.factor.to(f64) * x for s, x in zip(styles, ws)),
                     torch.zeros_like(inv_own))
        mean = sum((s.mean.to(f64) * x for s, x in zip(styles, ws)), torch.zeros_like(own_mean))
        factor = factor * (1 - alpha_c) + torch.linalg.inv(inv_own) * alpha_c
        mean = mean * (1 - alpha_c) + own_mean * alpha_c
    a = factor @ inv_own
    return a, mean - a @ own_mean
