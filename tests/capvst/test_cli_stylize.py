"""``capvst stylize``: outputs, folder mode, and one-line errors for bad input."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from capvst.cli import _parser, _run
from capvst.model import save_checkpoint, untrained

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "capvst", "examples")


def _img(path, size=(40, 28), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def run(argv, capsys):
    code = _run(argv, _parser)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def style(tmp_path):
    return _img(tmp_path / "style.png", seed=1)


def test_one_content_to_file_and_several_to_folder(tmp_path, style, capsys):
    a, b = _img(tmp_path / "a.jpg", seed=2), _img(tmp_path / "b.png", seed=3)
    code, err = run(["stylize", a, "--style", style, "-o", str(tmp_path / "one.webp")], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "one.webp").format == "WEBP"
    assert "UNTRAINED" in err  # no checkpoint configured: said loudly
    code, err = run(["stylize", a, b, "--style", style, "--style", a, "--style-weights",
                     "1,3", "--format", "jpg", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.jpg", "b.jpg"]
    assert Image.open(tmp_path / "out" / "a.jpg").size == (40, 28)


def test_same_result_from_folder_and_file_modes(tmp_path, style, capsys):
    a = _img(tmp_path / "a.png", seed=4)
    assert run(["stylize", a, "--style", style, "-o", str(tmp_path / "x.png")], capsys)[0] == 0
    assert run(["stylize", a, "--style", style, "-o", str(tmp_path / "d") + "/"], capsys)[0] == 0
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "d" / "a.png").read_bytes()


def _bad_inputs(tmp_path):
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(full.getvalue()[:300])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello, this is not an image\n" * 10)
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    return {
        "missing": (str(tmp_path / "nope.jpg"), "does not exist"),
        "non-image": (str(tmp_path / "text.jpg"), "not an image"),
        "truncated": (str(tmp_path / "truncated.jpg"), "image"),
        "empty": (str(tmp_path / "empty.jpg"), "0 bytes"),
        "1x1": (str(tmp_path / "tiny.png"), "at least 8"),
        "pixel-limit": (str(tmp_path / "big.png"), "over the limit"),
    }


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/capvst-evil-ran",))


def _bad_checkpoints(tmp_path):
    other = {"state_dict": {"encoder.weight": torch.zeros(8, 3, 3, 3)}}
    torch.save(other, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(4096))
    torch.save({"state_dict": {"x": _Evil()}}, tmp_path / "evil.pt")
    return {
        "other-network": (str(tmp_path / "other.pt"), "not a CAP-VSTNet checkpoint"),
        "not-a-checkpoint": (str(tmp_path / "junk.pt"), "not a PyTorch checkpoint"),
        "pickled-object": (str(tmp_path / "evil.pt"), "refused"),
    }


def _one_line_error(code, err, needle):
    assert code == 1
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1, err
    assert lines[0].startswith("capvst: error:") and needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing", "non-image", "truncated", "empty", "1x1",
                                  "pixel-limit"])
def test_bad_content_one_line_error(case, tmp_path, style, capsys, monkeypatch):
    monkeypatch.setenv("CAPVST_MAX_PIXELS", "50000")
    path, needle = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.png"
    code, err = run(["stylize", path, "--style", style, "-o", str(out)], capsys)
    _one_line_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("case", ["other-network", "not-a-checkpoint", "pickled-object"])
def test_bad_checkpoint_one_line_error(case, tmp_path, style, capsys):
    if os.path.exists("/tmp/capvst-evil-ran"):
        os.unlink("/tmp/capvst-evil-ran")
    path, needle = _bad_checkpoints(tmp_path)[case]
    code, err = run(["stylize", style, "--style", style, "--checkpoint", path, "-o",
                     str(tmp_path / "o.png")], capsys)
    _one_line_error(code, err, needle)
    assert not os.path.exists("/tmp/capvst-evil-ran")


def test_usage_errors_exit_2(tmp_path, style, capsys):
    for argv in (["stylize", style, "-o", "x.png"],  # no --style
                 ["stylize", style, "--style", style, "--alpha-c", "2", "-o", "x.png"],
                 ["stylize", style, "--style", style, "--content-mask", style, "-o", "x.png"],
                 ["stylize", style, "--style", style, "-o", "x.gif"]):
        with pytest.raises(SystemExit) as e:
            code, _ = run(argv, capsys)
            raise SystemExit(code)
        assert e.value.code == 2, argv


def test_mode_metadata_via_cli(tmp_path, style, capsys):
    ckpt = tmp_path / "art.pt"
    save_checkpoint(untrained("artistic").net, "artistic", ckpt)
    code, err = run(["stylize", style, "--style", style, "--checkpoint", str(ckpt), "-o",
                     str(tmp_path / "o.png")], capsys)
    _one_line_error(code, err, "--mode artistic")
    code, err = run(["stylize", style, "--style", style, "--mode", "artistic", "--checkpoint",
                     str(ckpt), "-o", str(tmp_path / "o.png")], capsys)
    assert code == 0, err


def test_console_script_end_to_end(tmp_path):
    """The installed ``capvst`` script itself: bundled examples in, image out, no traceback."""
    out = tmp_path / "cat.png"
    proc = subprocess.run(
        [sys.executable, "-m", "capvst", "stylize", os.path.join(EXAMPLES, "chelsea.jpg"),
         "--style", os.path.join(EXAMPLES, "rocket.jpg"), "--max-size", "64", "-o", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 40)
    bad = subprocess.run([sys.executable, "-m", "capvst", "stylize", str(tmp_path / "nope.png"),
                          "--style", str(out), "-o", str(tmp_path / "z.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("capvst: error:")


def test_full_resolution_and_tile_options(tmp_path, style, capsys):
    """``--max-size 0`` keeps every pixel (sides floored to multiples of 4); ``--tile`` is
    auto, off or a side of at least 64 pixels."""
    a = _img(tmp_path / "a.png", size=(143, 90), seed=4)
    for tile in ("auto", "off", "64"):
        out = tmp_path / f"full-{tile}.png"
        code, err = run(["stylize", a, "--style", style, "--max-size", "0", "--tile", tile,
                         "-o", str(out)], capsys)
        assert code == 0, err
        assert Image.open(out).size == (140, 88)
    for bad in (["--tile", "32"], ["--tile", "big"], ["--max-size", "4"]):
        with pytest.raises(SystemExit) as e:
            _run(["stylize", a, "--style", style, *bad, "-o", str(tmp_path / "x.png")], _parser)
        assert e.value.code == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err
