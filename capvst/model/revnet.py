"""The CAP-VSTNet reversible network: an exact bijection between images and latents.

Layout follows DESIGN.md §8 so that the authors' released checkpoints load with
``strict=True``: module names (``stack.N.conv.{1,4,7}``, ``channel_reduction.block_list``) and
tensor shapes are part of the contract, which is why ``conv`` stays an ``nn.Sequential``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..types import MODES, Mode

Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class NetConfig:
    """Hyper-parameters of one released configuration."""

    n_blocks: tuple[int, ...] = (10, 10, 10)
    n_strides: tuple[int, ...] = (1, 2, 2)
    n_channels: tuple[int, ...] = (16, 64, 256)
    in_channel: int = 3
    mult: int = 4
    kernel: int = 3
    hidden_dim: int = 16
    sp_steps: int = 2

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the transform works on."""
        return 2 * self.n_channels[-1] // 4**self.sp_steps

    @property
    def latent_stride(self) -> int:
        """Image side / latent side."""
        down = 1
        for s in self.n_strides:
            down *= s
        return down // 2**self.sp_steps

    @property
    def side_multiple(self) -> int:
        """Input sides must be divisible by this."""
        down = 1
        for s in self.n_strides:
            down *= s
        return down


CONFIGS: dict[Mode, NetConfig] = {
    "photorealistic": NetConfig(hidden_dim=16, sp_steps=2),
    "artistic": NetConfig(hidden_dim=64, sp_steps=1),
}


def _nhwc(x: Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (channels adjacent in memory), as a
    channels-last tensor and its channel slices are. Only speed depends on the answer."""
    return x.shape[1] > 1 and x.stride(1) == 1


def squeeze2(x: Tensor) -> Tensor:
    """Space-to-depth by 2: out channel (dy*2 + dx)*C + c holds pixel (2i+dy, 2j+dx) of c.

    The result keeps the input's memory format (NCHW or channels-last); the values are the
    same either way.
    """
    b, c, h, w = x.shape
    if _nhwc(x):
        y = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
        return y.permute(0, 3, 1, 2)
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2(x: Tensor) -> Tensor:
    """Exact inverse of :func:`squeeze2`, in the input's memory format."""
    b, c4, h, w = x.shape
    c = c4 // 4
    if _nhwc(x):
        y = x.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, c)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
        return y.permute(0, 3, 1, 2)
    x = x.reshape(b, 2, 2, c, h, w)
    return x.permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)


def _pad_channels(x: Tensor, extra: int) -> Tensor:
    """Injective padding: ``extra`` zero channels appended after the existing ones."""
    if extra == 0:
        return x
    fmt = torch.channels_last if _nhwc(x) else torch.contiguous_format
    zeros = x.new_zeros(x.shape[0], extra, *x.shape[2:]).contiguous(memory_format=fmt)
    return torch.cat((x, zeros), dim=1)


def _halves(x: Tensor) -> Pair:
    n = x.shape[1] // 2
    return x[:, :n], x[:, n:]


class RevBlock(nn.Module):
    """Additive coupling ``(x1, x2) -> (x2, x1 + F(x2))``, optionally downsampling by 2."""

    def __init__(self, channel: int, stride: int = 1, mult: int = 4, kernel: int = 3) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        pad = (kernel - 1) // 2
        width = channel // mult
        first_in = channel if stride == 1 else channel // 4
        self.conv = nn.Sequential(
            nn.ReflectionPad2d(pad),
            nn.Conv2d(first_in, width, kernel, stride=stride),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(pad),
            nn.Conv2d(width, width, kernel),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(pad),
            nn.Conv2d(width, channel, kernel),
        )

    def forward(self, pair: Pair) -> Pair:
        x1, x2 = pair
        fx2 = self.conv(x2)
        if self.stride == 2:
            x1, x2 = squeeze2(x1), squeeze2(x2)
        # in place on the fresh convolution output (which autograd does not keep): one
        # activation-sized allocation less per block, the same sum
        return x2, fx2.add_(x1)

    def inverse(self, pair: Pair) -> Pair:
        x2, y1 = pair
        if self.stride == 2:
            x2 = unsqueeze2(x2)
        # -F(x2) + y1 is y1 - F(x2) to the bit (negation is exact), without a new tensor
        x1 = self.conv(x2).neg_().add_(y1)
        if self.stride == 2:
            x1 = unsqueeze2(x1)
        return x1, x2


class ChannelRefinement(nn.Module):
    """Two stride-1 couplings, then ``sp_steps`` depth-to-space steps (the squeeze layout).

    Module name ``channel_reduction`` on :class:`RevNet` keeps the authors' key names.
    """

    def __init__(self, in_ch: int, hidden_dim: int, sp_steps: int, kernel: int = 3) -> None:
        super().__init__()
        width = hidden_dim * 4**sp_steps
        self.extra = width - in_ch // 2
        if self.extra < 0:
            raise ValueError("channel refinement cannot shrink its input")
        self.sp_steps = sp_steps
        self.block_list = nn.ModuleList(RevBlock(width, 1, 4, kernel) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        a, b = _halves(x)
        pair: Pair = (_pad_channels(a, self.extra), _pad_channels(b, self.extra))
        for block in self.block_list:
            pair = block(pair)
        x = torch.cat(pair, dim=1)
        for _ in range(self.sp_steps):
            x = unsqueeze2(x)
        return x

    def inverse(self, x: Tensor) -> Tensor:
        for _ in range(self.sp_steps):
            x = squeeze2(x)
        pair = _halves(x)
        for block in reversed(self.block_list):
            pair = block.inverse(pair)  # type: ignore[operator]
        keep = pair[0].shape[1] - self.extra
        return torch.cat((pair[0][:, :keep], pair[1][:, :keep]), dim=1)


class RevNet(nn.Module):
    """Image <-> latent bijection; ``forward`` encodes, ``inverse`` decodes exactly.

    ``channels_last``: run the activations in channels-last memory (faster convolutions on
    CPUs; the same values within float rounding, see docs/PERFORMANCE.md). Inputs may be in
    either format; outputs are always plain contiguous NCHW tensors.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.channels_last = False
        self.extra = 2 * config.n_channels[0] - config.in_channel
        blocks: list[RevBlock] = []
        for channel, depth, stride in zip(config.n_channels, config.n_blocks, config.n_strides):
            for i in range(depth):
                first_stride = stride if i == 0 else 1
                blocks.append(RevBlock(channel, first_stride, config.mult, config.kernel))
        self.stack = nn.ModuleList(blocks)
        self.channel_reduction = ChannelRefinement(
            2 * config.n_channels[-1], config.hidden_dim, config.sp_steps, config.kernel
        )

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless both sides fit the network's downsampling."""
        m = self.config.side_multiple
        # reflection padding at the coarsest scale needs two pixels there
        if height % m or width % m or height < 2 * m or width < 2 * m:
            raise ValueError(f"image sides must be multiples of {m} and at least {2 * m}, "
                             f"got {width}x{height}")

    def _format(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def forward(self, x: Tensor) -> Tensor:
        self.check_size(x.shape[-2], x.shape[-1])
        pair = _halves(_pad_channels(self._format(x), self.extra))
        for block in self.stack:
            pair = block(pair)
        return self.channel_reduction(torch.cat(pair, dim=1)).contiguous()

    def inverse(self, z: Tensor) -> Tensor:
        pair = _halves(self.channel_reduction.inverse(self._format(z)))
        for block in reversed(self.stack):
            pair = block.inverse(pair)  # type: ignore[operator]
        return torch.cat(pair, dim=1)[:, : self.config.in_channel].contiguous()


def build_net(mode: Mode) -> RevNet:
    """An untrained network of the given released configuration."""
    if mode not in CONFIGS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return RevNet(CONFIGS[mode])
