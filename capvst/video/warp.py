"""Temporal stability: the warping error between consecutive output frames.

For each pair of consecutive frames, the optical flow of the *input* frames (OpenCV's
Farnebäck, both directions) warps the previous output onto the current one; the error is the
mean squared difference (pixels in [0, 1], over the three channels) on the pixels the flow
tracks reliably, that is, not occluded by the forward-backward check of Ruder et al. (2016)
and not warped from outside the frame. A video's figure is the mean over its pairs, as in
Lai et al. (2018). Lower is steadier; a per-frame method that flickers scores higher.

Flow is computed on frames scaled down to at most ``MAX_SIDE`` pixels on the long edge, which
keeps the cost per frame small next to the model and changes the figure little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .media import require

#: Long edge at which flow and error are computed.
MAX_SIDE = 480
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2,
                  flags=0)


@dataclass(frozen=True)
class WarpStats:
    """A sum over frame pairs, so that segments add up to the video's figure exactly."""

    pairs: int = 0
    total: float = 0.0

    def __add__(self, other: WarpStats) -> WarpStats:
        return WarpStats(self.pairs + other.pairs, self.total + other.total)

    @property
    def value(self) -> float | None:
        """Mean warping error over the pairs, or None with no pair."""
        return self.total / self.pairs if self.pairs else None


def _prepare(img: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    scale = MAX_SIDE / max(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    return img


def pair_error(prev_in: np.ndarray, cur_in: np.ndarray, prev_out: np.ndarray,
               cur_out: np.ndarray) -> float | None:
    """Warping error of one pair (HWC uint8 RGB arrays of one size), or None when no pixel
    can be tracked."""
    cv2 = require("cv2")

    if prev_in.shape != cur_in.shape or prev_out.shape != cur_out.shape:
        raise ValueError("frames of a pair must have one size")
    if prev_in.shape[:2] != prev_out.shape[:2]:
        prev_in = cv2.resize(prev_in, prev_out.shape[1::-1], interpolation=cv2.INTER_AREA)
        cur_in = cv2.resize(cur_in, prev_out.shape[1::-1], interpolation=cv2.INTER_AREA)
    g_prev = cv2.cvtColor(_prepare(prev_in), cv2.COLOR_RGB2GRAY)
    g_cur = cv2.cvtColor(_prepare(cur_in), cv2.COLOR_RGB2GRAY)
    o_prev = _prepare(prev_out).astype(np.float32) / 255.0
    o_cur = _prepare(cur_out).astype(np.float32) / 255.0
    h, w = g_cur.shape
    # backward flow: cur(x) ~ prev(x + b(x)); forward flow: prev(y) ~ cur(y + f(y))
    back = cv2.calcOpticalFlowFarneback(g_cur, g_prev, None, **_FARNEBACK)  # type: ignore[call-overload]
    fwd = cv2.calcOpticalFlowFarneback(g_prev, g_cur, None, **_FARNEBACK)  # type: ignore[call-overload]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = xs + back[..., 0], ys + back[..., 1]
    warped = cv2.remap(o_prev, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    fwd_at = cv2.remap(fwd, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # forward-backward consistency (Ruder et al.): a tracked pixel's round trip returns home
    round_trip = ((back + fwd_at) ** 2).sum(-1)
    bound = 0.01 * ((back ** 2).sum(-1) + (fwd_at ** 2).sum(-1)) + 0.5
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    mask = (round_trip <= bound) & inside
    n = int(mask.sum())
    if n == 0:
        return None
    diff = ((o_cur - warped) ** 2).sum(-1)
    return float(diff[mask].sum() / (3 * n))


class WarpMeter:
    """Feeds frames in order and sums the error of each consecutive pair."""

    def __init__(self) -> None:
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self.stats = WarpStats()

    def push(self, inp: np.ndarray, out: np.ndarray) -> float | None:
        """Add the next (input, output) frame; returns the error of the pair it closes."""
        err = None
        if self._prev is not None:
            err = pair_error(self._prev[0], inp, self._prev[1], out)
            if err is not None:
                self.stats = self.stats + WarpStats(1, err)
        self._prev = (inp, out)
        return err


def warping_error(inputs: list[np.ndarray], outputs: list[np.ndarray]) -> WarpStats:
    """The figure of a whole sequence of (input, output) frames."""
    if len(inputs) != len(outputs):
        raise ValueError("as many inputs as outputs are needed")
    meter = WarpMeter()
    for i, o in zip(inputs, outputs):
        meter.push(i, o)
    return meter.stats
