"""The differentiable training cWCT: the inference transform's numbers, gradients, failures."""

from __future__ import annotations

import pytest
import torch

from capvst.model import cwct as inference
from capvst.training import cwct


def _latents(b=2, c=6, h=5, w=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype)


def test_matches_the_inference_transform():
    content, style = _latents(seed=1), _latents(h=6, w=4, seed=2) * 2 + 0.5
    out = cwct.transfer(content.float(), style.float())
    assert out.dtype == torch.float32 and out.shape == content.shape
    for i in range(2):
        want = inference.transfer(content[i].float(), [inference.style_moments(style[i])])
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)


def test_output_takes_the_target_statistics():
    content, target = _latents(c=4, seed=3), _latents(c=4, seed=4) * 3 - 1
    out = cwct.transfer(content, target).flatten(2)
    t = target.flatten(2)
    torch.testing.assert_close(out.mean(2), t.mean(2))
    cov = lambda x: (x - x.mean(2, keepdim=True)) @ (x - x.mean(2, keepdim=True)).transpose(1, 2)  # noqa: E731
    torch.testing.assert_close(cov(out) / (out.shape[2] - 1), cov(t) / (t.shape[2] - 1))


def test_gradients_are_exact(one_thread):
    content = _latents(b=1, c=3, h=3, w=4, seed=5).requires_grad_(True)
    target = _latents(b=1, c=3, h=2, w=4, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(cwct.transfer, (content, target))


def test_singular_covariance_is_loaded_like_the_authors(monkeypatch):
    content = _latents(b=2, c=3, seed=7)
    content[0, 2] = content[0, 1]  # rank 2: the plain factorisation fails for image 0
    calls = []

    def spy(cov):
        out = torch.linalg.cholesky_ex(cov)
        calls.append((cov.detach().clone(), out[1].clone()))
        return out

    monkeypatch.setattr(cwct, "factorize", spy)
    out = cwct.transfer(content, _latents(b=2, c=3, seed=8))
    assert torch.isfinite(out).all()
    first, info = calls[0]
    assert info.tolist() != [0, 0]
    loaded = next(c for c, i in calls[1:] if i.tolist() == [0, 0])
    # only the failed image was loaded, on the diagonal, by the authors' cumulative steps
    torch.testing.assert_close(loaded[1], first[1])
    added = loaded[0] - first[0]
    torch.testing.assert_close(added, torch.diag(added.diagonal()))
    steps = added.diagonal() / cwct.EPS
    assert steps.round().tolist() in ([1.0] * 3, [3.0] * 3, [6.0] * 3)


def test_failure_raises(monkeypatch):
    def never(cov):
        factor, info = torch.linalg.cholesky_ex(cov)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(cwct, "factorize", never)
    with pytest.raises(cwct.CholeskyFailure, match="after 10 diagonal loads"):
        cwct.transfer(_latents(), _latents(seed=1))


def test_non_finite_raises():
    content = _latents()
    content[0, 0, 0, 0] = float("nan")
    with pytest.raises(cwct.CholeskyFailure, match="not finite"):
        cwct.transfer(content, _latents(seed=1))
