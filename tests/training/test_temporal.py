"""Synthetic flow, warping and the temporal loss of the video stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capvst.training import temporal


def test_zero_flow_is_identity_and_integer_flow_shifts():
    x = torch.rand(2, 3, 9, 11)
    torch.testing.assert_close(temporal.warp(x, torch.zeros(2, 9, 11)), x)
    flow = torch.zeros(2, 9, 11)
    flow[0] = 2.0  # output pixel (y, x) takes input (y, x - 2)
    flow[1] = -1.0  # and (y + 1)
    out = temporal.warp(x, flow)
    torch.testing.assert_close(out[:, :, :8, 2:], x[:, :, 1:, :9])
    torch.testing.assert_close(out[:, :, :8, 0], x[:, :, 1:, 0])  # border repeated


def test_box_blur_matches_a_direct_mean():
    a = np.random.default_rng(0).random((2, 7, 30))
    k = 6
    out = temporal._box_blur(a, k, 2)
    padded = np.pad(a, [(0, 0), (0, 0), (k // 2, k - 1 - k // 2)], mode="reflect")
    want = np.stack([padded[..., i:i + k].mean(-1) for i in range(30)], -1)
    np.testing.assert_allclose(out, want, atol=1e-12)


@pytest.mark.parametrize("size", [(32, 48), (256, 256)])
def test_synthetic_flow_is_smooth_bounded_and_seeded(size):
    h, w = size
    a = temporal.synthetic_flow(h, w, np.random.default_rng(1))
    b = temporal.synthetic_flow(h, w, np.random.default_rng(1))
    assert a.shape == (2, h, w) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert a.abs().max() < temporal.SHIFT_LEVEL + 4 * temporal.MOTION_LEVEL
    # smooth: neighbouring pixels move almost alike
    assert (a[:, 1:] - a[:, :-1]).abs().max() < 1.0


def test_second_frame_and_loss():
    first = torch.rand(2, 3, 40, 40)
    second, flow = temporal.second_frame(first, np.random.default_rng(3))
    diff = second - temporal.warp(first, flow)
    assert 0 < diff.std() < 3e-3  # noise of 0.001 to 0.002
    assert temporal.temporal_loss(first, temporal.warp(first, flow), flow).item() == 0.0
    assert temporal.temporal_loss(first, torch.rand_like(first), flow).item() > 0.1
