"""Full resolution in bounded memory, through the real ``capvst stylize`` command.

Slow (minutes on a CPU): a 4000×3000 content at ``--max-size 0`` must finish with the whole
process's peak resident memory under 3 GB, and a whole image run tiled must match the same
image run untiled at a size where both fit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.refdata import REFERENCE

pytestmark = [pytest.mark.slow, pytest.mark.large]
STYLE = REFERENCE / "images" / "style" / "04.jpg"


def _content(path: Path, width: int, height: int) -> Path:
    img = Image.open(REFERENCE / "images" / "content" / "01.jpg").convert("RGB")
    img.resize((width, height), Image.Resampling.BICUBIC).save(path, compress_level=1)
    return path


def _stylize(content: Path, out: Path, checkpoint: Path, tile: str,
             budget: int | None = None) -> int:
    """Run ``capvst stylize`` at full resolution; its peak RSS in bytes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPVST_")}
    if budget is not None:
        env["CAPVST_MEMORY_BUDGET"] = str(budget)
    argv = [sys.executable, "-m", "capvst", "stylize", str(content), "--style", str(STYLE),
            "--max-size", "0", "--tile", tile, "--checkpoint", str(checkpoint),
            "--device", "cpu", "-o", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read() if proc.stderr else ""
    return usage.ru_maxrss * 1024


def test_4000x3000_full_resolution_in_3_gb(checkpoints, tmp_path):
    content = _content(tmp_path / "big.png", 4000, 3000)
    rss = _stylize(content, tmp_path / "out.png", checkpoints["photorealistic"], "auto",
                   budget=2_000_000_000)
    print(f"peak RSS {rss / 1e9:.2f} GB")
    assert rss < 3e9
    assert Image.open(tmp_path / "out.png").size == (4000, 3000)


def test_whole_image_tiled_matches_untiled(checkpoints, tmp_path):
    """The largest size run both ways here (2000×1500: untiled about 2.3 GB of activations),
    tiled in 2×2 tiles of 1000 pixels."""
    content = _content(tmp_path / "c.png", 2000, 1500)
    _stylize(content, tmp_path / "tiled.png", checkpoints["photorealistic"], "1000")
    _stylize(content, tmp_path / "whole.png", checkpoints["photorealistic"], "off")
    a = np.asarray(Image.open(tmp_path / "tiled.png")).astype(np.int16)
    b = np.asarray(Image.open(tmp_path / "whole.png")).astype(np.int16)
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999
