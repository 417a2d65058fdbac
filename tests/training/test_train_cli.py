"""``capvst train`` end to end, as a user runs it: tiny images (some unreadable), a random
VGG-19 in the published layout, both modes; the loss falls, the checkpoint works in
``capvst stylize`` and ``capvst.load_model``, and ``--resume`` continues the same run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import capvst
from capvst.errors import CheckpointError
from tests.services import REPO
from tests.training.helpers import image_folders, read_log, write_vgg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    # one readable content (two folders down) and one style: every step sees the same pair,
    # so a falling loss is learning, not a luckier draw of images
    content, style = image_folders(root, n_content=1, n_style=1)
    return {"content": content, "style": style, "vgg": write_vgg(root / "vgg.pth", seed=0)}


def _env(threads: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CAPVST_") and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if threads:
        # one thread keeps a shared two-core machine fast; the default-thread case is the
        # --resume run below and tests/training/test_data.py
        env["CAPVST_TORCH_THREADS"] = threads
    return env


def _capvst(*args: str, threads: str | None = "1", timeout: float = 400
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capvst", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(threads), cwd=str(REPO))


def _train(data, out: Path, mode: str, *extra: str, threads: str | None = "1"
           ) -> subprocess.CompletedProcess[str]:
    return _capvst("train", "--mode", mode, "--content", str(data["content"]), "--style",
                   str(data["style"]), "--vgg", str(data["vgg"]), "--out", str(out),
                   "--new-size", "32", "--crop", "32", "--device", "cpu", "--seed", "1", *extra,
                   threads=threads)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _check_run(out: Path, r: subprocess.CompletedProcess[str], mode: str, steps: int,
               video: int) -> list[dict]:
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(out)
    assert [x["step"] for x in log] == list(range(1, steps + 1))
    for x in log:
        assert {"step", "loss", "style", "content", "rec", "lap", "temporal"} <= set(x)
        parts = x["style"] + x["content"] + x["rec"] + x["lap"] + x["temporal"]
        assert x["loss"] == pytest.approx(parts)
        assert x["stage"] == ("video" if x["step"] > steps - video else "image")
        assert (x["temporal"] > 0) == (x["stage"] == "video")
        assert x["content"] == 0.0 and x["lap"] > 0 and x["rec"] > 0 and x["style"] > 0
    image = [x["loss"] for x in log if x["stage"] == "image"]
    assert _mean(image[-5:]) < 0.85 * _mean(image[:5]), image
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(u).name for u in summary["unreadable_files"]) == ["broken.jpg",
                                                                         "empty.png"]
    assert log[-1]["unreadable_files"] == 2 and log[-1]["skipped_cholesky"] == 0
    assert "skipping unreadable file" in r.stderr and "broken.jpg" in r.stderr
    data = (out / "checkpoint.pt").read_bytes()
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()
    env = f"CAPVST_CHECKPOINT_{mode.upper()}"
    assert f"use it: {env}={out / 'checkpoint.pt'} {env}_SHA256={summary['sha256']}" in r.stderr
    assert (out / "checkpoint_image.pt").is_file()
    assert (out / "samples" / f"step_{steps:08d}.jpg").is_file()
    grid = Image.open(out / "samples" / f"step_{steps:08d}.jpg")
    assert grid.size == (2 * 32, 4 * 32)  # batch 2; content, style, stylized, reconstruction
    return log


def test_photorealistic_train_stylize_resume(data, tmp_path):
    out = tmp_path / "photo"
    r = _train(data, out, "photorealistic", "--steps", "16", "--fine-tune-steps", "2")
    first = _check_run(out, r, "photorealistic", 16, 2)

    ckpt = out / "checkpoint.pt"
    model = capvst.load_model("photorealistic", str(ckpt))
    assert model.model_id == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]
    with pytest.raises(CheckpointError, match="saved for mode 'photorealistic'"):
        capvst.load_model("artistic", str(ckpt))

    content = next(data["content"].rglob("c0.png"))
    style = next(data["style"].glob("*.jpg"))
    styled = tmp_path / "styled.png"
    s = _capvst("stylize", str(content), "--style", str(style), "--checkpoint", str(ckpt),
                "-o", str(styled))
    assert s.returncode == 0, s.stderr
    assert "UNTRAINED" not in s.stderr
    assert Image.open(styled).size == (56 // 4 * 4, 44 // 4 * 4)

    # --resume, with PyTorch's default threads: the parent loads the checkpoint (parallel
    # copies) before its loader processes start
    before = torch.load(ckpt, weights_only=True)
    r2 = _train(data, out, "photorealistic", "--steps", "17", "--fine-tune-steps", "3",
                "--resume", threads=None)
    assert r2.returncode == 0, r2.stderr[-3000:]
    log = read_log(out)
    assert [x["step"] for x in log] == list(range(1, 18))
    assert log[:16] == first
    assert log[16]["stage"] == "video"
    after = torch.load(ckpt, weights_only=True)
    assert after["capvst"]["step"] == 17
    # Adam's state went on from the saved one: 17 updates per parameter, not 1
    assert {int(s["step"]) for s in before["optimizer"]["state"].values()} == {16}
    assert {int(s["step"]) for s in after["optimizer"]["state"].values()} == {17}
    assert any(not torch.equal(before["state_dict"][k], after["state_dict"][k])
               for k in before["state_dict"])


def test_artistic_train(data, tmp_path):
    out = tmp_path / "art"
    r = _train(data, out, "artistic", "--steps", "14", "--fine-tune-steps", "1")
    log = _check_run(out, r, "artistic", 14, 1)
    # the artistic recipe: Laplacian and reconstruction weights 1 (photorealistic: 1500, 10)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["capvst"]["config"]["lap_weight"] == 1.0
    assert ckpt["capvst"]["config"]["rec_weight"] == 1.0
    assert log[0]["lap"] < 1.0
    assert capvst.load_model("artistic", str(out / "checkpoint.pt")).mode == "artistic"
    # the run is over: --resume at the same --steps does nothing and says so
    again = _train(data, out, "artistic", "--steps", "14", "--fine-tune-steps", "1", "--resume")
    assert again.returncode == 0, again.stderr
    assert "14 of 14, 0 steps" in again.stderr
    assert len(read_log(out)) == 14
