"""The Matting Laplacian against independent closed-form computations, and its loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capvst.training import laplacian_loss, matting_laplacian
from capvst.training.laplacian import to_torch


def _dense_levin(img: np.ndarray, eps: float, r: int) -> np.ndarray:
    """Levin et al.'s formula written out per window and pixel pair, densely:
    L_ij = Σ_k [δ_ij − (1 + (I_i − μ_k)ᵀ (Σ_k + ε/|w| I)⁻¹ (I_j − μ_k)) / |w|] over the windows
    k that lie inside the image and contain both i and j."""
    x = img.astype(np.float64) / 255.0
    h, w, _ = x.shape
    d = 2 * r + 1
    n = d * d
    out = np.zeros((h * w, h * w))
    for cy in range(r, h - r):
        for cx in range(r, w - r):
            ys, xs = np.mgrid[cy - r:cy + r + 1, cx - r:cx + r + 1]
            idx = (ys * w + xs).ravel()
            colours = x[ys.ravel(), xs.ravel()]  # [n, 3]
            mu = colours.mean(axis=0)
            sigma = (colours - mu).T @ (colours - mu) / n
            inv = np.linalg.inv(sigma + eps / n * np.eye(3))
            aff = (1.0 + (colours - mu) @ inv @ (colours - mu).T) / n
            out[np.ix_(idx, idx)] += np.eye(n) - aff
    return out


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.random((h // 4 + 2, w // 4 + 2, 3))
    img = np.asarray(Image.fromarray((smooth * 255).astype(np.uint8)).resize((w, h)))
    noise = rng.integers(-20, 21, (h, w, 3))
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _assert_close(got, want) -> None:
    got = np.asarray(got.todense()) if hasattr(got, "todense") else np.asarray(got)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-6 * scale
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * scale)


@pytest.mark.parametrize("win_rad", [1, 2, 3])
@pytest.mark.parametrize("eps", [1e-7, 1e-4, 1e-2])
def test_equals_dense_closed_form(win_rad, eps):
    img = _image(13, 11, seed=win_rad)
    L = matting_laplacian(img, eps=eps, win_rad=win_rad)
    assert L.shape == (13 * 11, 13 * 11)
    _assert_close(L, _dense_levin(img, eps, win_rad))


@pytest.mark.parametrize("win_rad", [1, 2])
@pytest.mark.parametrize("eps", [1e-7, 1e-5])
def test_equals_pymatting(win_rad, eps):
    from pymatting import cf_laplacian

    img = _image(24, 31, seed=7)
    want = cf_laplacian(img.astype(np.float64) / 255.0, epsilon=eps, radius=win_rad)
    _assert_close(matting_laplacian(img, eps=eps, win_rad=win_rad), np.asarray(want.todense()))


def test_defaults_pil_input_and_structure():
    img = _image(20, 16, seed=3)
    L = matting_laplacian(Image.fromarray(img))  # eps 1e-7, radius 1
    _assert_close(L, _dense_levin(img, 1e-7, 1))
    dense = np.asarray(L.todense())
    np.testing.assert_allclose(dense, dense.T, atol=1e-9)            # symmetric
    np.testing.assert_allclose(dense.sum(axis=1), 0, atol=1e-9)        # rows sum to zero
    assert np.linalg.eigvalsh(dense).min() > -1e-8                     # positive semi-definite
    # a pixel couples only with pixels within 2·radius in each direction
    assert L.nnz == sum(min(y + 2, 19) - max(y - 2, 0) + 1 for y in range(20)) * \
        sum(min(x + 2, 15) - max(x - 2, 0) + 1 for x in range(16))


def test_constant_image_has_no_energy_for_constant_channel():
    L = matting_laplacian(np.full((9, 9, 3), 77, np.uint8))
    np.testing.assert_allclose(L @ np.ones(81), 0, atol=1e-9)


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        matting_laplacian(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        matting_laplacian(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        matting_laplacian(np.zeros((2, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        matting_laplacian(np.zeros((8, 8, 3), np.uint8), win_rad=0)


def test_loss_value_and_gradient_match_the_definition():
    img = _image(10, 12, seed=5)
    L = matting_laplacian(img)
    x = torch.rand(3, 10, 12, dtype=torch.float64)
    loss, grad = laplacian_loss(x, L)
    v = x.reshape(3, -1).numpy()
    want = sum(vc @ (L @ vc) for vc in v) / 120
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert grad.shape == x.shape
    np.testing.assert_allclose(grad.reshape(3, -1).numpy(), 2 * (L @ v.T).T / 120, rtol=1e-6)


def test_gradient_by_finite_differences():
    img = _image(8, 9, seed=11)
    L = to_torch(matting_laplacian(img), dtype=torch.float64)
    x = torch.rand(3, 8, 9, dtype=torch.float64)
    _, grad = laplacian_loss(x, L)
    rng = np.random.default_rng(0)
    h = 1e-6
    for _ in range(12):
        c, i, j = int(rng.integers(3)), int(rng.integers(8)), int(rng.integers(9))
        up, down = x.clone(), x.clone()
        up[c, i, j] += h
        down[c, i, j] -= h
        numeric = (laplacian_loss(up, L)[0] - laplacian_loss(down, L)[0]).item() / (2 * h)
        assert numeric == pytest.approx(grad[c, i, j].item(), rel=1e-5, abs=1e-9)


def test_float32_torch_path_matches_scipy():
    img = _image(32, 32, seed=2)
    L = matting_laplacian(img)
    x = torch.rand(3, 32, 32)
    a, ga = laplacian_loss(x, L)
    b, gb = laplacian_loss(x, to_torch(L))
    assert a.dtype == torch.float32
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(ga, gb)
    with pytest.raises(ValueError):
        laplacian_loss(torch.rand(3, 16, 16), L)
