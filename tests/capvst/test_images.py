"""Decoding, the resize rule, conversions and encoding."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from capvst import images
from capvst.errors import BadImage, InvalidItem, TooLarge, TooSmall
from tests.refdata import REFERENCE


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb():
    rgb = Image.new("RGB", (10, 6), (200, 100, 50))
    cases = {
        "L": Image.new("L", (10, 6), 77),
        "LA": Image.new("LA", (10, 6), (77, 9)),
        "P": rgb.convert("P"),
        "RGBA": Image.new("RGBA", (10, 6), (200, 100, 50, 0)),
        "CMYK": rgb.convert("CMYK"),
    }
    for mode, img in cases.items():
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out = images.decode_image(_png(img, fmt))
        assert out.mode == "RGB" and out.size == (10, 6), mode
    assert images.decode_image(_png(cases["L"])).getpixel((0, 0)) == (77, 77, 77)
    assert images.decode_image(_png(cases["RGBA"])).getpixel((0, 0)) == (200, 100, 50)


def test_16_bit_is_scaled_not_clipped():
    arr = np.full((6, 10), 65535, np.uint16)
    arr[0, 0] = 32896  # 128 * 257
    img = Image.fromarray(arr)
    out = images.decode_image(_png(img))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = images.decode_image(_png(img, "JPEG", exif=exif.tobytes(), quality=100))
    assert out.size == (10, 20)
    r, g, b = out.getpixel((5, 1))  # the red band is now at the top
    assert r > 200 and g < 60


def test_animated_uses_first_frame():
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = images.decode_image(buf.getvalue()).getpixel((3, 3))
    assert r > 200 and b < 60


@pytest.mark.parametrize("data,exc", [
    (b"", BadImage), (b"not an image at all", BadImage),
])
def test_bad_bytes(data, exc):
    with pytest.raises(exc):
        images.decode_image(data)


def test_truncated_jpeg():
    full = _png(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    with pytest.raises(BadImage):
        images.decode_image(full[: len(full) // 2])


def test_decompression_bomb_refused_from_header():
    bomb = _png(Image.new("1", (16000, 16000)))  # 256 MP of zeros, a few KB on disk
    assert len(bomb) < 100_000
    with pytest.raises(TooLarge, match="over the"):
        images.decode_image(bomb)
    under_pillows_limit = _png(Image.new("1", (12000, 12000)))  # 144 MP: our limit applies
    with pytest.raises(TooLarge, match="over the limit of 100,000,000"):
        images.decode_image(under_pillows_limit)
    with pytest.raises(TooLarge):
        images.decode_image(_png(Image.new("RGB", (50, 50))), max_pixels=2000)


@pytest.mark.parametrize("size,max_size,want", [
    ((3840, 2400), 128, (128, 80)), ((1200, 675), 512, (512, 288)),
    ((1000, 668), 512, (512, 340)), ((1920, 1080), 384, (384, 216)),
    ((570, 570), 512, (512, 512)), ((30, 23), 1280, (28, 20)), ((13, 9), 64, (12, 8)),
])
def test_resize_rule(size, max_size, want):
    assert images.resized_size(*size, max_size) == want
    assert images.resize(Image.new("RGB", size), max_size).size == want


def test_too_small():
    for size in ((1, 1), (3, 3), (100, 6), (7, 40)):
        with pytest.raises(TooSmall):
            images.resize(Image.new("RGB", size), 1280)


def test_tensor_conversions_match_the_original():
    arr = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    x = images.to_tensor(Image.fromarray(arr))
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x[0, :, 1, 2], torch.from_numpy(arr[1, 2]).float().div(255))
    y = torch.tensor([[-0.5, 0.0, 0.999, 1.0, 2.0, 0.5019]]).reshape(1, 1, 1, 6).repeat(1, 3, 1, 1)
    # scale, clamp, truncate (no rounding): 0.999*255 = 254.7 -> 254; 0.5019*255 = 127.98 -> 127
    assert images.to_uint8(y)[0, :, 0].tolist() == [0, 0, 254, 255, 255, 127]


def test_encode_round_trip():
    px = np.asarray(Image.effect_noise((16, 12), 30).convert("RGB"))
    for fmt in images.OUTPUT_FORMATS:
        data = images.encode(px, fmt)
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert back.shape == px.shape
        if fmt == "png":
            assert np.array_equal(back, px)
    assert images.format_for("a/b.JPEG") == "jpg"


def test_encoder_settings_change_files_not_png_pixels():
    img = Image.open(REFERENCE / "images" / "content" / "01.jpg").convert("RGB")
    px = np.asarray(img.resize((320, 240)))
    sizes = {}
    for level in (0, 1, 9):
        data = images.encode(px, "png", png_level=level)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), px)
        sizes[level] = len(data)
    assert sizes[0] > sizes[1] > sizes[9]
    assert images.encode(px, "png") == images.encode(px, "png", png_level=images.DEFAULT_PNG_LEVEL)
    for fmt, key in (("jpg", "jpeg_quality"), ("webp", "webp_quality")):
        low, high = (images.encode(px, fmt, **{key: q}) for q in (20, 95))
        assert len(low) < len(high)
        assert images.encode(px, fmt) == high  # the default quality is 95
    # a setting of another format is ignored
    assert images.encode(px, "png", jpeg_quality=5) == images.encode(px, "png")


def test_mask_colours_and_label_maps():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, 3:] = (0, 0, 255)        # blue -> 3
    rgb[0, 0] = (250, 250, 250)     # near white -> 1
    m = images.decode_mask(_png(Image.fromarray(rgb)), (6, 4))
    assert m[1, 1] == 0 and m[1, 4] == 3 and m[0, 0] == 1
    labels = np.array([[0, 7], [7, 200]], np.uint8)
    # single-channel masks are label maps; resized with nearest neighbour to the image size
    m2 = images.decode_mask(_png(Image.fromarray(labels, "L")), (4, 4))
    assert m2.shape == (4, 4) and set(np.unique(m2)) == {0, 7, 200}


@pytest.mark.slow
def test_a_100_megapixel_16_bit_tiff_decodes_in_bounded_memory(tmp_path):
    """A 16-bit greyscale TIFF of 10000x9990 (a few hundred KB compressed) used to cost about
    3 GB in float64 temporaries; now its own pixels plus the 8-bit result."""
    import subprocess
    import sys

    arr = np.zeros((9990, 10000), dtype=np.uint16)
    arr[:, ::7] = 40000
    path = tmp_path / "big16.tif"
    Image.fromarray(arr).save(path, compression="tiff_deflate")
    del arr
    script = (
        "import resource, sys\n"
        "from capvst.images import decode_image\n"
        "img = decode_image(open(sys.argv[1], 'rb').read(), 100_000_000)\n"
        "assert img.size == (10000, 9990) and img.mode == 'RGB'\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         text=True, check=True, timeout=300)
    peak_mib = int(out.stdout.split()[-1]) / 1024
    assert peak_mib < 1500, f"peak RSS {peak_mib:.0f} MiB"


def test_unsupported_or_corrupt_formats_are_bad_images():
    from capvst.errors import BadImage

    dds = b"DDS " + (124).to_bytes(4, "little") + bytes(120) + b"\x00" * 64
    tiff = b"II*\x00\x08\x00\x00\x00" + b"\xff" * 64  # a TIFF header with a broken directory
    for data in (dds, tiff):
        with pytest.raises(BadImage):
            images.decode_image(data)


def test_max_size_zero_keeps_full_resolution():
    assert images.resized_size(4001, 3003, 0) == (4000, 3000)
    assert images.resize(Image.new("RGB", (1283, 962)), 0).size == (1280, 960)
    with pytest.raises(InvalidItem):
        images.resize(Image.new("RGB", (64, 64)), 4)


def test_pixel_limit_above_pillows_bomb_limit():
    """CAPVST_MAX_PIXELS replaces Pillow's bomb limit (2 × 89.5 MP), so it can be raised for
    panoramas: a 196 MP header opens when the limit allows it."""
    big = _png(Image.new("1", (14000, 14000)))
    with pytest.raises(TooLarge):
        images._open(big, images.DEFAULT_MAX_PIXELS)
    assert images._open(big, 200_000_000).size == (14000, 14000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # restored
