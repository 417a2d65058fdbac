"""A differentiable, batched cWCT for training.

The same transform as :mod:`capvst.model.cwct` (centre, covariance with divisor N − 1, lower
Cholesky factors, whiten with the content's, colour with the target's, add the target's
mean), written for autograd over a batch. Inference keeps its own implementation, tuned for
one image and a cached style; this one must stay differentiable, which fixes its own
choices: a triangular solve instead of an explicit inverse, float64 inside.

When a factorisation fails, the diagonal is loaded as the authors do (``k·EPS·I`` at the
k-th retry, cumulatively) but only a few times: a batch whose covariance is still not
positive definite (or not finite) raises :class:`CholeskyFailure`, and the training loop
skips that batch instead of training through an ill-conditioned factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The authors' diagonal loading step (their k-th retry has added k·EPS in all).
EPS = 2e-5
#: Diagonal loads tried before a batch is given up.
MAX_LOADING_STEPS = 10


class CholeskyFailure(RuntimeError):
    """A feature covariance of the batch could not be factorised."""


def factorize(cov: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex`` of a batch: (factors, info). A seam for tests."""
    return torch.linalg.cholesky_ex(cov)


def cholesky(cov: Tensor) -> Tensor:
    """Lower Cholesky factors of a batch of covariances ``[B, C, C]``, differentiably."""
    if not bool(torch.isfinite(cov).all()):
        raise CholeskyFailure("feature covariance is not finite")
    factor, info = factorize(cov)
    if not bool((info != 0).any()):
        return factor
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    load = torch.zeros(cov.shape[0], 1, 1, dtype=cov.dtype, device=cov.device)
    for step in range(1, MAX_LOADING_STEPS + 1):
        # only the failed ones are loaded further; the others keep their exact factor
        load = load + (info != 0).to(cov.dtype).view(-1, 1, 1) * (step * EPS)
        factor, info = factorize(cov + load * eye)
        if not bool((info != 0).any()):
            return factor
    raise CholeskyFailure(f"feature covariance is not positive definite after "
                          f"{MAX_LOADING_STEPS} diagonal loads")


def _stats(feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [B, C, 1], centred features [B, C, N], Cholesky factor [B, C, C])."""
    mean = feat.mean(dim=2, keepdim=True)
    centred = feat - mean
    cov = centred @ centred.transpose(1, 2) / (feat.shape[2] - 1)
    return mean, centred, cholesky(cov)


def transfer(content: Tensor, target: Tensor) -> Tensor:
    """cWCT of each content latent ``[B, C, H, W]`` towards the statistics of the target
    latent of the same batch position ``[B, C, h, w]``; differentiable in both."""
    if content.shape[:2] != target.shape[:2]:
        raise ValueError(f"content {tuple(content.shape)} and target {tuple(target.shape)} "
                         "latents do not pair up")
    b, c, h, w = content.shape
    cf = content.reshape(b, c, -1).to(torch.float64)
    tf = target.reshape(b, c, -1).to(torch.float64)
    if cf.shape[2] < 2 or tf.shape[2] < 2:
        raise ValueError("a covariance needs at least two latent positions")
    _, c_centred, c_factor = _stats(cf)
    t_mean, _, t_factor = _stats(tf)
    white = torch.linalg.solve_triangular(c_factor, c_centred, upper=False)
    out = t_factor @ white + t_mean
    return out.to(content.dtype).reshape(b, c, h, w)
