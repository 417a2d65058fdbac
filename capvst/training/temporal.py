"""Synthetic optical flow and the temporal loss of the video fine-tuning stage.

The recipe is the authors' (after "Consistent Video Style Transfer via Compound
Regularization", Wang et al. 2020): no video is needed. A smooth random flow is drawn (a
coarse grid of normal displacements with standard deviation ``MOTION_LEVEL`` pixels, one
cell per 100 pixels, resized bilinearly to the image, plus a random integer shift of up to
``SHIFT_LEVEL`` pixels, then a 100×100 box blur); the second frame is the content warped by
it plus a little Gaussian noise; the loss is the mean absolute difference between the first
stylized frame warped by the same flow and the stylized second frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MOTION_LEVEL = 8.0
SHIFT_LEVEL = 10
NOISE_LEVEL = 1e-3
BLUR = 100


def _box_blur(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Mean over a window of ``k`` along ``axis`` (anchor k//2, mirrored borders: OpenCV's
    ``blur`` with its default border)."""
    n = a.shape[axis]
    k = max(1, min(k, n))
    before, after = k // 2, k - 1 - k // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (before, after)
    padded = np.pad(a, pad, mode="reflect") if n > 1 else np.pad(a, pad, mode="edge")
    c = np.cumsum(padded, axis=axis)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    return (np.take(c, np.arange(k, k + n), axis=axis)
            - np.take(c, np.arange(0, n), axis=axis)) / k


def synthetic_flow(height: int, width: int, rng: np.random.Generator) -> Tensor:
    """A smooth random flow ``[2, H, W]`` (x then y displacement, pixels)."""
    coarse = rng.normal(0.0, MOTION_LEVEL, size=(max(1, height // 100), max(1, width // 100), 2))
    grid = torch.from_numpy(coarse).permute(2, 0, 1).unsqueeze(0)
    flow = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0]
    arr = flow.numpy().copy()
    arr[0] += rng.integers(-SHIFT_LEVEL, SHIFT_LEVEL + 1)
    arr[1] += rng.integers(-SHIFT_LEVEL, SHIFT_LEVEL + 1)
    arr = _box_blur(_box_blur(arr, BLUR, 1), BLUR, 2)
    return torch.from_numpy(arr).float()


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """Backward warp of ``x`` ``[B, C, H, W]`` by ``flow`` ``[2, H, W]``: output pixel p takes
    ``x`` at ``p - flow(p)`` (nearest, border pixels repeated outside)."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    flow = flow.to(device=x.device, dtype=x.dtype)
    gx = (xs - flow[0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys - flow[1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0).expand(b, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=True)


def second_frame(first: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """(a fake next frame of ``first`` ``[B, 3, H, W]``, the flow that made it)."""
    flow = synthetic_flow(first.shape[2], first.shape[3], rng).to(first.device)
    moved = warp(first, flow)
    std = NOISE_LEVEL * (1.0 + float(rng.random()))
    noise = torch.from_numpy(rng.normal(0.0, std, size=tuple(moved.shape))).to(moved)
    return moved + noise, flow


def temporal_loss(stylized_first: Tensor, stylized_second: Tensor, flow: Tensor) -> Tensor:
    """Mean absolute difference between the first stylized frame moved by ``flow`` and the
    stylized second frame."""
    return (warp(stylized_first, flow) - stylized_second).abs().mean()
