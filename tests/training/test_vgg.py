"""The VGG-19 loss network: the published file layout, clear errors, features and losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capvst.errors import CheckpointError
from capvst.training.vgg import VGGEncoder, check_state_dict, expected_shapes, load_state_dict
from tests.training.helpers import VGG_CONVS, vgg_state_dict, write_vgg


def test_layout_is_the_published_one():
    want = {}
    for pos, cin, cout, k in VGG_CONVS:
        want[f"{pos}.weight"] = (cout, cin, k, k)
        want[f"{pos}.bias"] = (cout,)
    assert expected_shapes() == want


def test_features_are_relu1_1_to_relu4_1(tmp_path):
    sd = vgg_state_dict(seed=3)
    enc = VGGEncoder.from_file(write_vgg(tmp_path / "vgg.pth", seed=3))
    x = torch.rand(2, 3, 32, 40)
    feats = enc.features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 40), (2, 128, 16, 20),
                                               (2, 256, 8, 10), (2, 512, 4, 5)]
    # relu1_1 by hand: 1x1 conv, reflection pad, conv1_1, ReLU
    y = F.conv2d(x, sd["0.weight"], sd["0.bias"])
    y = F.relu(F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), sd["2.weight"], sd["2.bias"]))
    torch.testing.assert_close(feats[0], y)
    assert not any(p.requires_grad for p in enc.parameters())


def test_only_layers_up_to_relu4_1_are_needed(tmp_path):
    sd = vgg_state_dict(upto=30)
    torch.save(sd, tmp_path / "short.pth")
    assert set(load_state_dict(tmp_path / "short.pth")) == set(sd)


@pytest.mark.parametrize("change, expect", [
    (lambda sd: sd.pop("9.weight"), "missing keys (e.g. 9.weight, shape (128, 64, 3, 3))"),
    (lambda sd: sd.__setitem__("features.0.weight", torch.zeros(1)), "unexpected keys"),
    (lambda sd: sd.__setitem__("2.weight", torch.zeros(64, 3, 5, 5)),
     "2.weight: (64, 3, 5, 5) instead of (64, 3, 3, 3)"),
])
def test_mismatches_are_explained(tmp_path, change, expect):
    sd = vgg_state_dict(upto=30)
    change(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "bad.pth")
    assert expect in err.value.message
    assert "Expected the nn.Sequential layout" in err.value.message


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_state_dict(tmp_path / "list.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        load_state_dict(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")


def test_module_prefix_and_wrapped_state_dict_are_accepted():
    sd = {f"module.{k}": v for k, v in vgg_state_dict(upto=30).items()}
    assert set(check_state_dict({"state_dict": sd})) == {k[7:] for k in sd}


def test_style_and_content_losses(tmp_path):
    enc = VGGEncoder(check_state_dict(vgg_state_dict(upto=30)))
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 0.5
    fa, fb = enc.features(a), enc.features(b)
    assert enc.style_loss(fa, fa).item() == 0.0
    assert enc.style_loss(fa, fb).item() > 0
    assert enc.content_loss(fa, fa).item() == 0.0
    # the mean/std statistics, written out for relu1_1 alone
    ma, mb = fa[0].mean((2, 3)), fb[0].mean((2, 3))
    sa = (fa[0].flatten(2).var(2) + 1e-5).sqrt()
    sb = (fb[0].flatten(2).var(2) + 1e-5).sqrt()
    first = F.mse_loss(ma, mb) + F.mse_loss(sa, sb)
    assert enc.style_loss(fa[:1], fb[:1]).item() == pytest.approx(first.item(), rel=1e-5)
