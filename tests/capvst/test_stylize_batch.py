"""Batches through the network give each item what it gets alone; masked styles are cached."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from capvst import images
from capvst.errors import InvalidItem
from capvst.model.checkpoint import untrained
from capvst.stylize import Stylizer
from tests.data import image_bytes, mask_bytes


def _img(size, seed):
    return Image.open(io.BytesIO(image_bytes(size, seed=seed))).convert("RGB")


def _within_parity(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff == 0).mean())


@pytest.fixture(scope="module", params=["photorealistic", "artistic"])
def stylizer(request):
    return Stylizer(untrained(request.param), "cpu")


def test_batch_equals_one_at_a_time(stylizer):
    # two sizes after the resize: a batch of three and a batch of one
    contents = [_img((80, 60), 1), _img((64, 48), 2), _img((80, 60), 3), _img((80, 60), 4)]
    styles = [_img((72, 72), 8), _img((60, 80), 9)]
    kw = dict(weights=[0.3, 0.7], alpha_c=0.2, max_size=64)
    batch = stylizer.stylize_batch(contents, styles, style_keys=["s8", "s9"], **kw)
    assert [o.shape for o in batch] == [(48, 64, 3), (48, 64, 3), (48, 64, 3), (48, 64, 3)]
    for content, got in zip(contents, batch):
        _within_parity(got, stylizer.stylize(content, styles, **kw))
    one_style = stylizer.stylize_batch(contents[:3], styles[:1], max_size=64)
    for content, got in zip(contents[:3], one_style):
        _within_parity(got, stylizer.stylize(content, styles[:1], max_size=64))


def test_batch_validates_like_one(stylizer):
    with pytest.raises(InvalidItem):
        stylizer.stylize_batch([_img((64, 48), 1)], [], max_size=64)
    with pytest.raises(InvalidItem):
        stylizer.stylize_batch([_img((64, 48), 1)], [_img((64, 48), 2)], alpha_c=2.0)


def test_masked_style_statistics_computed_once(stylizer):
    style = _img((64, 48), 5)
    calls = []

    def load():
        calls.append(1)
        return style

    mask = mask_bytes((64, 48), 0.4)
    outs = [stylizer.stylize(_img((64, 48), k), [load], max_size=64,
                             content_mask=mask_bytes((64, 48), 0.6), style_mask=mask,
                             style_keys=["s5#1"], mask_key="m#1") for k in (1, 2)]
    assert len(calls) == 1 and stylizer.has_style("s5#1", 64, "m#1")
    fresh = stylizer.stylize(_img((64, 48), 2), [style], max_size=64,
                             content_mask=mask_bytes((64, 48), 0.6), style_mask=mask)
    assert np.array_equal(outs[1], fresh)


def test_round_trip_at_float32(stylizer):
    x = images.to_tensor(_img((64, 48), 6))
    assert (stylizer.inverse(stylizer.forward(x)) - x).abs().max().item() < 1e-5


@pytest.mark.slow
def test_layouts_and_compiled_passes_agree():
    """channels-last (the CPU default), NCHW, and opt-in torch.compile: the same outputs within
    the parity tolerance (compiling takes tens of seconds, hence slow)."""
    model = untrained("photorealistic")
    content, style = _img((96, 72), 5), _img((64, 64), 6)
    outs = {}
    for name, kw in (("nchw", {"channels_last": False}), ("channels-last", {}),
                     ("compiled", {"compile": True})):
        st = Stylizer(model, "cpu", **kw)
        assert st.net.channels_last == (name != "nchw")
        outs[name] = st.stylize(content, [style], max_size=96)
    _within_parity(outs["channels-last"], outs["nchw"])
    _within_parity(outs["compiled"], outs["nchw"])
