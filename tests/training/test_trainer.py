"""The training loop in-process: a Cholesky failure mid-run is skipped and counted."""

from __future__ import annotations

import json

import pytest
import torch

from capvst.settings import Settings
from capvst.training import TrainConfig, cwct, train
from tests.training.helpers import image_folders, read_log, write_vgg


@pytest.mark.slow
def test_cholesky_failure_mid_run_is_skipped_and_counted(tmp_path, monkeypatch, capsys,
                                                         one_thread):
    content, style = image_folders(tmp_path, n_content=1, n_style=1)
    calls = {"n": 0}
    real = cwct.factorize
    # a step makes four factorisations (content and style, then the cycle's two); the first
    # one of step 3 and every diagonal load after it fail, as a singular covariance would
    doomed = range(8, 8 + 1 + cwct.MAX_LOADING_STEPS)

    def flaky(cov):
        n = calls["n"]
        calls["n"] += 1
        factor, info = real(cov)
        return (factor, torch.ones_like(info)) if n in doomed else (factor, info)

    monkeypatch.setattr(cwct, "factorize", flaky)
    cfg = TrainConfig(mode="photorealistic", content=str(content), style=str(style),
                      vgg=str(write_vgg(tmp_path / "vgg.pth")), out=str(tmp_path / "out"),
                      steps=6, fine_tune_steps=0, new_size=32, crop=32, device="cpu",
                      workers=0)
    summary = train(cfg, Settings(), progress="lines")
    assert summary["skipped_cholesky"] == 1 and summary["step"] == 6
    log = read_log(tmp_path / "out")
    assert [x["step"] for x in log] == [1, 2, 4, 5, 6]
    assert [x["skipped_cholesky"] for x in log] == [0, 0, 1, 1, 1]
    assert "step 3: batch skipped" in capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["skipped_cholesky"] == 1
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    # five optimizer updates: the skipped batch changed nothing
    assert ckpt["capvst"]["step"] == 6
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {5}
