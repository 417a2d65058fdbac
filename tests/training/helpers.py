"""Inputs of the training tests: a random VGG-19 in the published layout, small image folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.data import image_bytes

# The sequence positions of the convolutions in AdaIN's / CAP-VSTNet's vgg_normalised.pth,
# written out independently of capvst.training.vgg: (position, in, out, kernel).
VGG_CONVS = [(0, 3, 3, 1), (2, 3, 64, 3), (5, 64, 64, 3), (9, 64, 128, 3), (12, 128, 128, 3),
             (16, 128, 256, 3), (19, 256, 256, 3), (22, 256, 256, 3), (25, 256, 256, 3),
             (29, 256, 512, 3), (32, 512, 512, 3), (35, 512, 512, 3), (38, 512, 512, 3),
             (42, 512, 512, 3), (45, 512, 512, 3), (48, 512, 512, 3), (51, 512, 512, 3)]


def vgg_state_dict(seed: int = 0, upto: int = 52) -> dict[str, torch.Tensor]:
    """A randomly initialised VGG-19 (He init, zero biases) with the published keys."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for pos, cin, cout, k in VGG_CONVS:
        if pos >= upto:
            break
        sd[f"{pos}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** .5
        sd[f"{pos}.bias"] = torch.zeros(cout)
    return sd


def write_vgg(path: Path, seed: int = 0) -> Path:
    torch.save(vgg_state_dict(seed), path)
    return path


def image_folders(root: Path, n_content: int = 3, n_style: int = 2) -> tuple[Path, Path]:
    """content/ (nested: even-numbered images two levels down, with unreadable files and a
    non-image) and style/ folders."""
    content, style = root / "content", root / "style"
    (content / "nested" / "deeper").mkdir(parents=True)
    style.mkdir(parents=True)
    for i in range(n_content):
        where = content if i % 2 else content / "nested" / "deeper"
        (where / f"c{i}.png").write_bytes(image_bytes((56, 44), seed=i))
    for i in range(n_style):
        (style / f"s{i}.jpg").write_bytes(image_bytes((48, 60), seed=100 + i, fmt="JPEG"))
    (content / "nested" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (content / "empty.png").write_bytes(b"")
    (content / "README.txt").write_text("not an image, ignored")
    return content, style


def read_log(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if x.strip()]
