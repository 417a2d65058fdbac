"""The network: layout, parameter count, exact inverse."""

import pytest
import torch

from capvst.model import CONFIGS, build_net, untrained
from capvst.model.revnet import squeeze2, unsqueeze2


@pytest.mark.parametrize("mode", ["photorealistic", "artistic"])
def test_parameter_count_and_keys(mode):
    net = build_net(mode)
    assert sum(p.numel() for p in net.parameters()) == 4_089_936
    keys = set(net.state_dict())
    assert len(keys) == 192
    assert "stack.29.conv.7.bias" in keys
    assert "channel_reduction.block_list.1.conv.4.weight" in keys
    # a stride-2 block takes channel/4 inputs in its first convolution
    assert net.state_dict()["stack.10.conv.1.weight"].shape == (16, 16, 3, 3)
    assert net.state_dict()["stack.20.conv.1.weight"].shape == (64, 64, 3, 3)


def test_squeeze_channel_order():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = squeeze2(x)
    # output channel (dy*2 + dx)*C + c holds pixel (2i+dy, 2j+dx) of channel c
    for dy in range(2):
        for dx in range(2):
            for c in range(2):
                assert torch.equal(y[0, (dy * 2 + dx) * 2 + c], x[0, c, dy::2, dx::2])
    assert torch.equal(unsqueeze2(y), x)


def test_squeeze_keeps_channels_last_and_values():
    x = torch.randn(2, 12, 8, 6, generator=torch.Generator().manual_seed(5))
    xl = x.contiguous(memory_format=torch.channels_last)
    y, yl = squeeze2(x), squeeze2(xl)
    assert yl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, yl)
    back = unsqueeze2(yl)
    assert back.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(back, x)
    # a channel slice of a channels-last tensor (the couplings' halves) squeezes the same
    assert torch.equal(squeeze2(xl[:, 6:]), squeeze2(x[:, 6:]))


@pytest.mark.parametrize("mode", ["photorealistic", "artistic"])
def test_channels_last_network_agrees(mode):
    """The channels-last path gives the NCHW latents and images within float rounding, in
    plain NCHW tensors, and does not touch its input."""
    net = untrained(mode).net
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(11))
    keep = x.clone()
    with torch.inference_mode():
        z = net(x)
        net.channels_last = True
        zl = net(x)
        y = net.inverse(zl)
        zk = zl.clone()
        net.inverse(zl)
    assert torch.equal(x, keep) and torch.equal(zl, zk)
    assert zl.is_contiguous() and y.is_contiguous()
    assert (zl - z).abs().max().item() <= 1e-5
    assert (y - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["photorealistic", "artistic"])
@pytest.mark.parametrize("size", [(8, 8), (20, 36), (64, 64), (100, 12), (48, 32)])
def test_round_trip(mode, size):
    net = untrained(mode).net
    g = torch.Generator().manual_seed(size[0] * 131 + size[1])
    x = torch.rand(1, 3, *size, generator=g)
    with torch.inference_mode():
        z = net(x)
        cfg = CONFIGS[mode]
        s = cfg.latent_stride
        assert z.shape == (1, cfg.latent_channels, size[0] // s, size[1] // s)
        assert (net.inverse(z) - x).abs().max().item() <= 1e-5


def test_round_trip_batch_and_range():
    """Inputs far outside [0, 1] and a batch: still an exact bijection."""
    net = untrained("photorealistic").net
    x = torch.randn(3, 3, 24, 40, generator=torch.Generator().manual_seed(3)) * 3
    with torch.inference_mode():
        assert (net.inverse(net(x)) - x).abs().max().item() <= 1e-5


def test_size_checks():
    net = build_net("photorealistic")
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 3, 10, 12))
    with pytest.raises(ValueError, match="at least 8"):
        net(torch.zeros(1, 3, 4, 12))


def test_latent_geometry():
    assert CONFIGS["photorealistic"].latent_channels == 32
    assert CONFIGS["photorealistic"].latent_stride == 1
    assert CONFIGS["artistic"].latent_channels == 128
    assert CONFIGS["artistic"].latent_stride == 2
