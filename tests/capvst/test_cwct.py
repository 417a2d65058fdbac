"""cWCT: statistics, agreement with an SVD-based WCT, bounded fallback, masks."""

import numpy as np
import pytest
import torch

from capvst.errors import ModelError
from capvst.model import cwct


def _feat(c, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64) * scale + torch.eye(
        c, dtype=torch.float64) * 2
    return mix @ torch.randn(c, n, generator=g, dtype=torch.float64) + torch.randn(
        c, 1, generator=g, dtype=torch.float64)


def _stats(x):
    m = x.mean(1)
    xc = x - m[:, None]
    return m, xc @ xc.T / (x.shape[1] - 1)


def test_output_matches_style_statistics():
    c, s = _feat(16, 900, 1).reshape(16, 30, 30), _feat(16, 700, 2, 3.0).reshape(16, 28, 25)
    out = cwct.transfer(c, [cwct.style_moments(s)])
    assert out.shape == c.shape and out.dtype == torch.float64
    m_o, cov_o = _stats(out.reshape(16, -1))
    m_s, cov_s = _stats(s.reshape(16, -1))
    assert ((m_o - m_s).norm() / m_s.norm()).item() < 1e-6
    assert ((cov_o - cov_s).norm() / cov_s.norm()).item() < 1e-6


def _svd_wct(c, s):
    mc, cc = _stats(c)
    ms, cs = _stats(s)
    ec, vc = torch.linalg.eigh(cc)
    es, vs = torch.linalg.eigh(cs)
    white = vc @ torch.diag(ec.rsqrt()) @ vc.T @ (c - mc[:, None])
    return vs @ torch.diag(es.sqrt()) @ vs.T @ white + ms[:, None]


def test_agrees_with_svd_wct_statistics():
    c, s = _feat(8, 500, 3), _feat(8, 400, 4, 2.0)
    ours = cwct.transfer(c.reshape(8, 20, 25), [cwct.style_moments(s.reshape(8, 20, 20))])
    theirs = _svd_wct(c, s)
    m1, c1 = _stats(ours.reshape(8, -1))
    m2, c2 = _stats(theirs)
    assert torch.allclose(m1, m2, atol=1e-9) and torch.allclose(c1, c2, atol=1e-9)


def test_equals_svd_wct_when_covariances_are_diagonal():
    """With axis-aligned covariances both whitening/colouring factors are the same matrix."""
    def diagonal_cov(seed, n, scales):
        x = _feat(len(scales), n, seed)
        m, cov = _stats(x)
        # exactly whiten with a symmetric root, then scale rows: covariance diag(scales²)
        e, v = torch.linalg.eigh(cov)
        w = v @ torch.diag(e.rsqrt()) @ v.T @ (x - m[:, None])
        return torch.tensor(scales, dtype=torch.float64)[:, None] * w + m[:, None]

    c = diagonal_cov(5, 600, [1.0, 2.0, 0.5, 3.0])
    s = diagonal_cov(6, 500, [0.7, 1.5, 2.5, 0.2])
    ours = cwct.transfer(c.reshape(4, 20, 30), [cwct.style_moments(s.reshape(4, 20, 25))])
    assert torch.allclose(ours.reshape(4, -1), _svd_wct(c, s), atol=1e-9)


def test_singular_style_covariance_finishes_finite():
    c = _feat(32, 400, 7).reshape(32, 20, 20)
    flat = torch.ones(32, 1, dtype=torch.float64) * torch.linspace(0, 1, 400,
                                                                     dtype=torch.float64)
    out = cwct.transfer(c, [cwct.style_moments(flat.reshape(32, 20, 20))])  # rank-1 covariance
    assert torch.isfinite(out).all()
    constant = torch.full((32, 20, 20), 0.25, dtype=torch.float64)  # zero covariance
    assert torch.isfinite(cwct.transfer(c, [cwct.style_moments(constant)])).all()


def test_non_finite_features_fail_fast():
    bad = torch.full((4, 5, 5), float("nan"), dtype=torch.float64)
    with pytest.raises(ModelError, match="not finite"):
        cwct.style_moments(bad)


def test_regularisation_is_bounded(monkeypatch):
    monkeypatch.setattr(cwct, "MAX_REGULARISATION_STEPS", 3)
    cov = -torch.eye(4, dtype=torch.float64)  # never positive definite with tiny loads
    with pytest.raises(ModelError, match="after 3 regularisation steps"):
        cwct.cholesky_factor(cov)


def test_interpolation_endpoints():
    c, s1, s2 = (_feat(6, 300, k).reshape(6, 15, 20) for k in (8, 9, 10))
    st = [cwct.style_moments(s1), cwct.style_moments(s2)]
    only_first = cwct.transfer(c, st, [1.0, 0.0])
    assert torch.allclose(only_first, cwct.transfer(c, st[:1]), atol=1e-10)
    # alpha_c = 1: the content's own statistics, i.e. the content comes back
    assert torch.allclose(cwct.transfer(c, st, [0.3, 0.7], alpha_c=1.0), c, atol=1e-9)
    mid = cwct.transfer(c, st, [0.3, 0.7], alpha_c=0.4).reshape(6, -1)
    want_mean = (0.3 * st[0].mean + 0.7 * st[1].mean) * 0.6 + c.reshape(6, -1).mean(1) * 0.4
    assert torch.allclose(mid.mean(1), want_mean, atol=1e-10)


def test_weights_validated_and_normalised():
    assert cwct.check_weights(2, [1, 3]) == [0.25, 0.75]
    assert cwct.check_weights(2, [0.3, 0.7]) == [0.3, 0.7]
    with pytest.raises(ValueError):
        cwct.check_weights(2, [1.0])
    with pytest.raises(ValueError):
        cwct.check_weights(2, [-1.0, 2.0])
    with pytest.raises(ValueError):
        cwct.check_alpha(1.5)


def test_label_selection_rules():
    content = np.zeros((20, 20), np.uint8)
    content[:10] = 1          # label 1: 200 px
    content[10:, :1] = 2      # label 2: 10 px  (not > 10)
    content[10:, 1:2] = 3     # label 3: 10 px
    content[10:, 2:] = 4      # label 4: 180 px
    style = np.zeros((40, 40), np.uint8)
    style[:2, :] = 1          # label 1: 80 px
    style[2:, :] = 4          # label 4: 1520 px
    style[0, 0:15] = 3        # label 3 in style only partly
    assert cwct.label_selection(content, style) == [1, 4]
    ratio = np.full((100, 100), 5, np.uint8)
    tiny = np.zeros((100, 100), np.uint8)
    tiny[:1, :12] = 5         # 12 px vs 10000 px: ratio >= 100
    assert cwct.label_selection(ratio, tiny) == []


def test_masked_transfer_keeps_unselected_positions():
    c = _feat(4, 400, 11).reshape(4, 20, 20)
    s = _feat(4, 400, 12, 2.0).reshape(4, 20, 20)
    cm = np.zeros((20, 20), np.uint8)
    cm[:, 10:] = 1
    cm[0, 0] = 7  # a label absent from the style: keeps content values
    sm = np.zeros((20, 20), np.uint8)
    sm[5:, :] = 1
    out = cwct.transfer_masked(c, s, cm, sm)
    assert out[:, 0, 0].equal(c[:, 0, 0])
    # each label's positions carry the style's statistics of that label
    sel = torch.from_numpy((cm == 1).reshape(-1))
    m_o, _ = _stats(out.reshape(4, -1)[:, sel])
    m_s, _ = _stats(s.reshape(4, -1)[:, torch.from_numpy((sm == 1).reshape(-1))])
    assert torch.allclose(m_o, m_s, atol=1e-9)


# --- the folded transform ------------------------------------------------------------------
def _reference_transfer(c, styles, weights, alpha_c):
    """The original's float64 computation: whiten with inv(Lc), colour with the mixed factor
    (the content's own re-inverted from inv(Lc)), add the mixed mean."""
    def mom(x):
        m, cov = _stats(x)
        return m, torch.linalg.cholesky(cov)

    mc, lc = mom(c)
    inv_lc = torch.linalg.inv(lc)
    white = inv_lc @ (c - mc[:, None])
    if len(styles) == 1 and alpha_c == 0.0 and weights is None:
        ms, ls = mom(styles[0])
    else:
        w = weights or [1.0 / len(styles)] * len(styles)
        parts = [mom(s) for s in styles]
        ms = sum(k * m for k, (m, _l) in zip(w, parts))
        ls = sum(k * fac for k, (_m, fac) in zip(w, parts))
        ls = ls * (1 - alpha_c) + torch.linalg.inv(inv_lc) * alpha_c
        ms = ms * (1 - alpha_c) + mc * alpha_c
    return ls @ white + ms[:, None]


@pytest.mark.parametrize("weights,alpha_c,n_styles", [
    (None, 0.0, 1), ([1.0], 0.0, 1), (None, 0.6, 1), ([0.3, 0.7], 0.0, 2),
    ([0.2, 0.5, 0.3], 0.25, 3)])
def test_affine_map_equals_the_reference_transform(weights, alpha_c, n_styles):
    c = _feat(32, 2000, 20, 0.7) + 3.0  # an offset far from zero: b must carry it
    styles = [_feat(32, 1500 + 100 * k, 21 + k, 1.5) for k in range(n_styles)]
    own = cwct.style_moments(c.reshape(32, 40, 50))
    stats = [cwct.style_moments(s.reshape(32, 1, -1)) for s in styles]
    a, b = cwct.affine_map(own, stats, weights, alpha_c)
    assert a.shape == (32, 32) and b.shape == (32,) and a.dtype == b.dtype == torch.float64
    want = _reference_transfer(c, styles, weights, alpha_c)
    got = a @ c + b[:, None]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-10
    # and transfer() is this map, in float64 and (within float32 rounding) in float32
    full = cwct.transfer(c.reshape(32, 40, 50), stats, weights, alpha_c).reshape(32, -1)
    assert ((full - want).abs().max() / want.abs().max()).item() < 1e-10
    f32 = cwct.transfer(c.float().reshape(32, 40, 50), stats, weights, alpha_c,
                        dtype=torch.float32)
    assert f32.dtype == torch.float32
    assert ((f32.reshape(32, -1).double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_affine_map_is_the_identity_at_alpha_one():
    c = _feat(8, 400, 30)
    s = _feat(8, 300, 31, 2.0)
    a, b = cwct.affine_map(cwct.style_moments(c.reshape(8, 20, 20)),
                           [cwct.style_moments(s.reshape(8, 15, 20))], None, 1.0)
    assert torch.allclose(a, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert b.abs().max().item() < 1e-12


def test_large_passes_in_chunks_equal_one_pass(monkeypatch):
    c = _feat(16, 5000, 40).float().reshape(16, 50, 100)
    st = [cwct.style_moments(_feat(16, 3000, 41).reshape(16, 30, 100))]
    whole = cwct.transfer(c, st, dtype=torch.float64)
    monkeypatch.setattr(cwct, "CHUNK_ELEMENTS", 16 * 1100)  # five chunks, the last short
    chunked = cwct.transfer(c, st, dtype=torch.float64)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(cwct.style_moments(c).factor,
                          cwct.style_moments(c, torch.float32).factor, rtol=1e-4, atol=1e-6)


def test_label_moments_reused_across_contents_equal_the_masked_transfer():
    s = _feat(4, 600, 50, 2.0).reshape(4, 20, 30)
    sm = np.zeros((20, 30), np.uint8)
    sm[:, 12:] = 1
    sm[0, :2] = 3  # two pixels: never selected
    stats = cwct.label_moments(s, sm)
    assert set(stats.moments) == {0, 1}
    for seed in (51, 52):
        c = _feat(4, 400, seed).reshape(4, 20, 20)
        cm = np.zeros((20, 20), np.uint8)
        cm[seed - 45:, :] = 1
        want = cwct.transfer_masked(c, s, cm, sm)
        assert torch.equal(cwct.transfer_labels(c, cm, stats), want)


def test_a_failing_label_fails_only_contents_that_use_it():
    s = _feat(4, 400, 60).reshape(4, 20, 20).clone()
    sm = np.zeros((20, 20), np.uint8)
    sm[10:] = 1
    s[:, 10:] = float("nan")  # label 1's statistics cannot be computed
    stats = cwct.label_moments(s, sm)
    assert isinstance(stats.moments[1], ModelError)
    c = _feat(4, 400, 61).reshape(4, 20, 20)
    only0 = np.zeros((20, 20), np.uint8)
    assert torch.isfinite(cwct.transfer_labels(c, only0, stats)).all()
    both = np.zeros((20, 20), np.uint8)
    both[5:] = 1
    with pytest.raises(ModelError, match="not finite"):
        cwct.transfer_labels(c, both, stats)
