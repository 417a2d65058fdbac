"""Exact tiled inference: the reach of the network, and tiles against one whole pass.

Weights are the reference networks (``checkpoints``), so the numbers are those of a real
checkpoint's architecture. Tolerances are the parity ones: latents within 1e-4, outputs within
one level with at least 99.9 % of pixels identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capvst import images, load_model
from capvst.model import tiled
from capvst.stylize import Stylizer
from tests.refdata import REFERENCE

IMAGES = REFERENCE / "images"
MASKS = REFERENCE / "masks"


@pytest.fixture(scope="module")
def nets(checkpoints):
    torch.set_num_threads(2)
    return {m: load_model(m, str(p)) for m, p in checkpoints.items()}


def _image(name: str, width: int, height: int) -> Image.Image:
    """A reference photo resized to exactly ``width``×``height`` (a real image's texture)."""
    img = images.decode_image(IMAGES / name)
    return img.resize((width, height), Image.Resampling.BICUBIC)


def _style(name: str, side: int = 256) -> Image.Image:
    """A reference style, small: styles run at full resolution too, and time is short here."""
    return images.resize(images.decode_image(IMAGES / "style" / name), side)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert (diff == 0).mean() >= 0.999, f"identical {(diff == 0).mean():.5f}"


# -- the reach ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["photorealistic", "artistic"])
def test_reach_from_the_architecture(nets, mode):
    net = nets[mode].net
    assert tiled.forward_reach(net) == {"photorealistic": 234, "artistic": 233}[mode]
    assert tiled.inverse_reach(net) == {"photorealistic": 237, "artistic": 237}[mode]
    assert tiled.halo(net) == 240
    assert tiled.halo(net) % net.config.side_multiple == 0


def _extent(changed: np.ndarray, centre: int, scale: int) -> int:
    """How far (pixels) from ``centre`` the changed columns reach, both ways."""
    cols = np.flatnonzero(changed)
    return max(centre - cols.min() * scale, (cols.max() + 1) * scale - 1 - centre)


@pytest.mark.parametrize("mode", ["photorealistic",
                                  pytest.param("artistic", marks=pytest.mark.slow)])
def test_reach_measured(nets, mode):
    """One changed pixel (or latent position) changes nothing beyond the derived reach, and
    the change does travel most of it: the bound is not loose."""
    net = nets[mode].net
    ls = net.config.latent_stride
    width, centre = 640, 320
    x = images.to_tensor(_image("content/01.jpg", width, 32))
    y = x.clone()
    y[0, :, 16, centre] += 0.5
    with torch.inference_mode():
        zx, zy = net(x), net(y)
        changed = ((zx - zy).abs() > 0).any(dim=(0, 1, 2)).numpy()
        reach = _extent(changed, centre, ls)
        assert 0.8 * tiled.forward_reach(net) <= reach <= tiled.forward_reach(net)
        z2 = zx.clone()
        z2[0, :, 16 // ls, centre // ls] += 0.5
        changed = ((net.inverse(zx) - net.inverse(z2)).abs() > 0).any(dim=(0, 1, 2)).numpy()
        lo, hi = centre // ls * ls, centre // ls * ls + ls - 1
        cols = np.flatnonzero(changed)
        reach = max(lo - cols.min(), cols.max() - hi)
        assert 0.8 * tiled.inverse_reach(net) <= reach <= tiled.inverse_reach(net)


# -- tiles --------------------------------------------------------------------------------------
def test_tiles_cover_the_image_once():
    grid = tiled.tiles(100, 260, 64, 24)
    cover = np.zeros((100, 260), dtype=int)
    for t in grid:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert t.oy0 == max(0, t.y0 - 24) and t.ox1 == min(260, t.x1 + 24)
    assert (cover == 1).all()
    assert len(grid) == tiled.tile_count(100, 260, 64) == 2 * 5


def test_statistics_merge_matches_one_pass():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(8, 5000, generator=g, dtype=torch.float64) * 3 + 7
    acc = tiled.Accumulator(8)
    for part in feat.split([1, 999, 2500, 1500], dim=1):
        acc.add(part)
    centred = feat - feat.mean(1, keepdim=True)
    assert torch.allclose(acc.mean, feat.mean(1), atol=1e-12)
    assert torch.allclose(acc.m2 / 4999, centred @ centred.T / 4999, atol=1e-10)


@pytest.mark.parametrize("on_disk", [False, True])
def test_latent_store_round_trip(on_disk):
    store = tiled.LatentStore(3, 10, 12, on_disk)
    data = np.arange(3 * 10 * 12, dtype=np.float32).reshape(3, 10, 12)
    store.write(0, 0, data[:, :6, :5])
    store.write(0, 5, data[:, :6, 5:])
    store.write(6, 0, data[:, 6:])
    assert np.array_equal(store.read(0, 10, 0, 12), data)
    assert np.array_equal(store.read(3, 8, 4, 11), data[:, 3:8, 4:11])
    store.close()


def _latent_case(net, img: Image.Image, side: int, on_disk: bool) -> None:
    pixels = np.asarray(img)
    ls = net.config.latent_stride
    h, w = pixels.shape[:2]
    store = tiled.LatentStore(net.config.latent_channels, h // ls, w // ls, on_disk)
    acc = tiled.encode(net, pixels, side, store=store)[-1]
    with torch.inference_mode():
        whole = net(images.to_tensor(img))[0]
    got = torch.from_numpy(store.read(0, h // ls, 0, w // ls))
    assert (got - whole).abs().max().item() <= 1e-4
    feat = whole.reshape(whole.shape[0], -1).double()
    assert torch.allclose(acc.mean, feat.mean(1), atol=1e-9)
    centred = feat - feat.mean(1, keepdim=True)
    assert torch.allclose(acc.m2 / (acc.n - 1), centred @ centred.T / (acc.n - 1), atol=1e-7)
    store.close()


def test_strip_latents_match_whole(nets):
    """The fast case: a strip cut into tiles along its length, the latent kept on disk."""
    _latent_case(nets["photorealistic"].net, _image("content/02.jpg", 720, 32), 128, True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["photorealistic", "artistic"])
def test_strip_output_matches_whole(nets, mode):
    model = nets[mode]
    img = _image("content/02.jpg", 720, 32)
    _latent_case(model.net, img, 96, on_disk=False)
    st = Stylizer(model, "cpu")
    style = _style("03.jpeg")
    want = st.stylize(img, [style], max_size=0, tile="off")
    for side in (96, 200):
        _close(st.stylize(img, [style], max_size=0, tile=side), want)


CASES = [
    # mode, width, height, tile side, what: each cuts both axes
    ("photorealistic", 560, 520, 280, "plain"),
    ("artistic", 544, 560, 272, "mix"),
    ("photorealistic", 520, 520, 192, "masks"),
    ("artistic", 560, 528, 264, "masks"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode,width,height,side,what", CASES,
                         ids=[f"{c[0][:5]}-{c[1]}x{c[2]}-t{c[3]}-{c[4]}" for c in CASES])
def test_tiled_matches_whole(nets, mode, width, height, side, what, tmp_path, monkeypatch):
    model = nets[mode]
    net = model.net
    content = _image("content/05.jpg", width, height)
    st = Stylizer(model, "cpu")
    kw: dict = {}
    if what == "mix":
        styles = [_style("03.jpeg"), _style("06.png")]
        kw = {"weights": [0.3, 0.7], "alpha_c": 0.2}
    else:
        styles = [_style("04.jpg")]
    if what == "masks":
        cm = Image.open(MASKS / "photo-05-04-384-masks-content.png")
        cm.resize((width, height), Image.Resampling.NEAREST).save(tmp_path / "cm.png")
        kw = {"content_mask": str(tmp_path / "cm.png"),
              "style_mask": str(MASKS / "photo-05-04-384-masks-style.png"),
              "alpha_c": 0.1 if mode == "artistic" else 0.0}
    want = st.stylize(content, styles, max_size=0, tile="off", **kw)
    # the tiled run's latent, as stored before the decode pass
    kept: list[np.ndarray] = []
    close = tiled.LatentStore.close

    def keep(self):
        if self._mem is not None:
            kept.append(self.read(0, self.shape[1], 0, self.shape[2]))
        close(self)

    monkeypatch.setattr(tiled.LatentStore, "close", keep)
    done: list[tuple[int, int]] = []
    got = st.stylize(content, styles, max_size=0, tile=side,
                     progress=lambda d, t: done.append((d, t)), **kw)
    _close(got, want)
    assert done and done[-1][0] == done[-1][1] and len(done) == done[-1][1]
    with torch.inference_mode():
        whole = net(images.to_tensor(content))[0].numpy()
    assert kept and np.abs(kept[0] - whole).max() <= 1e-4


def test_auto_tiles_only_over_the_budget(nets, monkeypatch):
    st = Stylizer(nets["photorealistic"], "cpu", memory_budget=2 << 30)
    assert st.tile_side(600, 800) is None
    side = st.tile_side(3000, 4000)
    assert side is not None and side % 4 == 0 and side >= tiled.MIN_TILE
    assert st.tile_side(600, 800, "off") is None
    assert st.tile_side(600, 800, 130) == 128


@pytest.mark.slow
def test_out_of_memory_retries_in_smaller_tiles(nets, monkeypatch):
    """A whole pass that runs out of memory is retried in tiles; so is a tile that does."""
    from capvst.errors import ModelError

    model = nets["photorealistic"]
    st = Stylizer(model, "cpu")
    img = _image("content/01.jpg", 720, 48)
    style = _style("03.jpeg")
    want = st.stylize(img, [style], max_size=0, tile="off")
    real_forward = type(model.net).forward
    widths: list[int] = []

    def forward(self, x):
        widths.append(x.shape[-1])
        if x.shape[-1] > 600:  # pretend wider inputs do not fit: the whole image, 360 tiles
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_forward(self, x)

    monkeypatch.setattr(type(model.net), "forward", forward)
    _close(st.stylize(img, [style], max_size=0, tile="auto"), want)
    # the content's whole pass (720 wide) ran out of memory, then its tiles fit (the style,
    # encoded first, is narrower)
    first = widths.index(720)
    assert max(widths[first + 1:]) <= 720 and widths[-1] <= 600
    with pytest.raises(ModelError, match="out of memory"):
        st.stylize(img, [style], max_size=0, tile="off")
