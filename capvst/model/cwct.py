"""Cholesky-based whitening and colouring transform (cWCT) on CAP-VSTNet latents.

All functions take one image's latent, ``[C, H, W]`` or ``[1, C, H, W]``. Whitening with the
content's factor and colouring with the style's are folded into one affine map,
``A = Ls · Lc⁻¹`` and ``b = ms − A · mc`` (:func:`affine_map`), so the output is
``A @ feat + b`` in one pass over the features. The small ``C × C`` work (covariance
factorisation, the triangular solve) is always float64. ``dtype`` names the precision of the
large ``C × N`` work: the covariance accumulation after centring (summed over column chunks in
float64) and the final product. docs/MODEL.md gives the measured error of each choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
#: Elements per column chunk of the large passes: bounds their extra memory to one chunk
#: and the float32 accumulation error to a chunk's length (chunk sums are added in float64).
#: Smaller chunks measured slower on a CPU (each matrix product packs its operands anew).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Moments:
    """Mean ``[C]`` and lower Cholesky factor ``[C, C]`` of a feature covariance."""

    mean: Tensor
    factor: Tensor


def _flatten(latent: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    if latent.dim() == 4:
        if latent.shape[0] != 1:
            raise ValueError("cWCT works on one image at a time")
        latent = latent[0]
    if latent.dim() != 3:
        raise ValueError(f"expected a [C, H, W] latent, got shape {tuple(latent.shape)}")
    flat = latent.reshape(latent.shape[0], -1)
    return flat if dtype is None else flat.to(dtype)


def _step(feat: Tensor) -> int:
    return max(1024, CHUNK_ELEMENTS // max(1, feat.shape[0]))


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


def _statistics(feat: Tensor, dtype: torch.dtype) -> Moments:
    """Mean and Cholesky factor (float64) of ``feat`` ``[C, N]``; the centred chunks and their
    products are computed in ``dtype``, the chunk sums accumulated in float64."""
    n = feat.shape[1]
    if n < 2:
        raise ModelError("a covariance needs at least two feature positions")
    step = _step(feat)
    if feat.dtype == torch.float64 or dtype != torch.float64:
        # a pairwise (cascade) sum in the features' own dtype
        mean = feat.sum(dim=1).to(torch.float64) / n
    else:
        mean = torch.zeros(feat.shape[0], dtype=torch.float64, device=feat.device)
        for j in range(0, n, step):
            mean += feat[:, j:j + step].to(torch.float64).sum(dim=1)
        mean /= n
    m = mean.to(dtype)[:, None]
    cov = torch.zeros(feat.shape[0], feat.shape[0], dtype=torch.float64, device=feat.device)
    for j in range(0, n, step):
        chunk = feat[:, j:j + step].to(dtype) - m
        cov += (chunk @ chunk.T).to(torch.float64)
    cov /= n - 1
    return Moments(mean, cholesky_factor(cov))


def moments(feat: Tensor) -> tuple[Moments, Tensor]:
    """Moments of ``feat`` ``[C, N]`` (large work in ``feat``'s dtype) and the centred
    features."""
    stats = _statistics(feat, feat.dtype)
    return stats, feat - stats.mean.to(feat.dtype)[:, None]


def style_moments(latent: Tensor, dtype: torch.dtype = torch.float64) -> Moments:
    """Statistics of a style latent (float64 whatever ``dtype``, the precision of the
    covariance accumulation); cache and reuse them across contents."""
    return _statistics(_flatten(latent), dtype)


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


def affine_map(own: Moments, styles: Sequence[Moments], weights: Sequence[float] | None,
               alpha_c: float) -> tuple[Tensor, Tensor]:
    """The whole transfer as one affine map: ``A`` ``[C, C]`` and ``b`` ``[C]`` (float64)
    with ``transfer(feat) == A @ feat + b[:, None]`` for the (uncentred) features whose
    statistics are ``own``.

    ``A = L · Lc⁻¹`` by one triangular solve, ``L`` the style factor (or the weighted mix of
    style factors, blended by ``alpha_c`` towards ``Lc``); ``b = m − A · mc`` with ``m`` the
    (mixed, blended) style mean.
    """
    if not styles:
        raise ValueError("at least one style is needed")
    alpha_c = check_alpha(alpha_c)
    w = check_weights(len(styles), weights)
    f64 = torch.float64
    lc, mc = own.factor.to(f64), own.mean.to(f64)
    for s in styles:
        if s.mean.shape[0] != mc.shape[0]:
            raise ValueError("style statistics come from another network configuration")
    if w is None and alpha_c == 0.0:
        factor, mean = styles[0].factor.to(f64), styles[0].mean.to(f64)
    else:
        ws = [1.0] * len(styles) if w is None else w
        factor = torch.zeros_like(lc)
        mean = torch.zeros_like(mc)
        for s, k in zip(styles, ws):
            factor = factor + s.factor.to(f64) * k
            mean = mean + s.mean.to(f64) * k
        factor = factor * (1 - alpha_c) + lc * alpha_c
        mean = mean * (1 - alpha_c) + mc * alpha_c
    a = torch.linalg.solve_triangular(lc, factor, upper=False, left=False)  # factor · Lc⁻¹
    return a, mean - a @ mc


def _apply(feat: Tensor, a: Tensor, b: Tensor, dtype: torch.dtype, out: Tensor | None = None
           ) -> Tensor:
    """``a @ feat + b`` in ``dtype``, chunk by chunk into ``out`` (``feat``'s dtype)."""
    if out is None:
        out = torch.empty_like(feat)
    a_, b_ = a.to(dtype), b.to(dtype)[:, None]
    if feat.dtype == dtype:
        return torch.addmm(b_, a_, feat, out=out)
    step = _step(feat)
    for j in range(0, feat.shape[1], step):
        out[:, j:j + step] = torch.addmm(b_, a_, feat[:, j:j + step].to(dtype))
    return out


def transfer(content: Tensor, styles: Sequence[Moments], weights: Sequence[float] | None = None,
             alpha_c: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """cWCT of a content latent towards one style or a weighted mix of styles.

    With one style and ``alpha_c == 0`` this is the plain transform; otherwise the
    interpolation form, where ``alpha_c`` blends towards the content's own statistics.
    ``dtype`` is the precision of the large passes (the ``C × C`` work is float64).
    Returns a latent of the content's shape and dtype.
    """
    if not styles:
        raise ValueError("at least one style is needed")
    feat = _flatten(content)
    for s in styles:
        if s.mean.shape[0] != feat.shape[0]:
            raise ValueError("style statistics come from another network configuration")
    a, b = affine_map(_statistics(feat, dtype), styles, weights, alpha_c)
    return _apply(feat, a, b, dtype).reshape(content.shape)


def _selected(content_mask: np.ndarray, style_counts: dict[int, int]) -> list[int]:
    c_labels, c_counts = np.unique(content_mask, return_counts=True)
    chosen = []
    for label, a in zip(c_labels.tolist(), c_counts.tolist()):
        b = int(style_counts.get(int(label), 0))
        if a > MIN_LABEL_PIXELS and b > MIN_LABEL_PIXELS and a / b < MAX_LABEL_RATIO \
                and b / a < MAX_LABEL_RATIO:
            chosen.append(int(label))
    return chosen


def _counts(mask: np.ndarray) -> dict[int, int]:
    labels, counts = np.unique(mask, return_counts=True)
    return {int(k): int(v) for k, v in zip(labels.tolist(), counts.tolist())}


def label_selection(content_mask: np.ndarray, style_mask: np.ndarray) -> list[int]:
    """Labels taking part in a masked transfer, by the original's rules at image size."""
    return _selected(content_mask, _counts(style_mask))


def _resize_labels(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.reshape(-1)
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)).reshape(-1)


@dataclass(frozen=True)
class LabelMoments:
    """A style's statistics per mask label, for masked transfers of many contents.

    ``counts`` are the label's pixels in the style mask at image size (for the selection
    rules); ``moments`` holds each label's statistics on its latent columns, or the
    :class:`ModelError` that computing them raised (raised again when a content uses it).
    Labels with fewer than two latent positions are absent (never transferred).
    """

    counts: dict[int, int]
    moments: dict[int, Moments | ModelError] = field(default_factory=dict)


def label_moments(style: Tensor, style_mask: np.ndarray, dtype: torch.dtype = torch.float64
                  ) -> LabelMoments:
    """Per-label statistics of a style latent under its 2-D label map at image size."""
    if style_mask.ndim != 2:
        raise ValueError("masks must be 2-D label maps")
    counts = _counts(style_mask)
    feat = _flatten(style)
    sh, sw = style.shape[-2:]
    lab = _resize_labels(style_mask, sh, sw)
    out: dict[int, Moments | ModelError] = {}
    for label, n in counts.items():
        if n <= MIN_LABEL_PIXELS:
            continue  # never selected
        idx = np.flatnonzero(lab == label)
        if idx.size < 2:
            continue
        sel = torch.from_numpy(idx).to(feat.device)
        try:
            out[label] = _statistics(feat.index_select(1, sel), dtype)
        except ModelError as exc:
            out[label] = exc
    return LabelMoments(counts, out)


def transfer_labels(content: Tensor, content_mask: np.ndarray, style: LabelMoments,
                    alpha_c: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-label cWCT with a style's precomputed :class:`LabelMoments`."""
    alpha_c = check_alpha(alpha_c)
    if content_mask.ndim != 2:
        raise ValueError("masks must be 2-D label maps")
    c_feat = _flatten(content)
    ch, cw = content.shape[-2:]
    c_lab = _resize_labels(content_mask, ch, cw)
    out = c_feat.clone()
    for label in _selected(content_mask, style.counts):
        stats = style.moments.get(label)
        c_idx = np.flatnonzero(c_lab == label)
        if stats is None or c_idx.size < 2:
            continue
        if isinstance(stats, ModelError):
            raise stats
        c_sel = torch.from_numpy(c_idx).to(c_feat.device)
        part = c_feat.index_select(1, c_sel)
        a, b = affine_map(_statistics(part, dtype), [stats], None, alpha_c)
        out[:, c_sel] = _apply(part, a, b, dtype)
    return out.reshape(content.shape)


def transfer_masked(content: Tensor, style: Tensor, content_mask: np.ndarray,
                    style_mask: np.ndarray, alpha_c: float = 0.0,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-label cWCT: each label of the content takes the statistics of the same label in
    the style. Masks are 2-D uint8 label maps at image size; labels that do not take part, or
    that shrink to fewer than two latent positions, keep the content's latent values.
    """
    check_alpha(alpha_c)
    if content_mask.ndim != 2 or style_mask.ndim != 2:
        raise ValueError("masks must be 2-D label maps")
    return transfer_labels(content, content_mask, label_moments(style, style_mask, dtype),
                           alpha_c, dtype)
