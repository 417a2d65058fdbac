"""Training data: image folders (local or ``s3://``), the authors' resize and crop, and
Matting Laplacians built in data-loader worker processes.

Workers are started with ``spawn``: a forked child of a process that has already run
parallel PyTorch code can block forever in its first parallel region (GNU OpenMP is not
fork-safe), and the trainer has by then loaded the VGG and the network. A spawned worker is a
fresh interpreter; it gets the dataset by pickling, and builds its own storage client.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CapvstError
from .laplacian import matting_laplacian

if TYPE_CHECKING:
    from ..settings import Settings
    from ..storage import Storage

#: File name endings read as images (case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
#: Draws of another image after an unreadable one before the data is declared unusable.
MAX_REDRAWS = 50


class DataError(CapvstError):
    """The training data cannot be used (an empty folder, nothing readable)."""

    code = "invalid_item"


def list_images(root: str, storage: Storage) -> list[str]:
    """Every image file under ``root`` (a folder, searched recursively), sorted."""
    found = [u for u in storage.iter_uris(root)
             if posixpath.basename(u).lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return sorted(found)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """The shorter side to ``size``, the longer in proportion (truncated), bilinear: what the
    authors' ``transforms.Resize(new_size)`` does to a PIL image."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def random_crop(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size``×``size`` crop at a uniformly random position, as an H×W×3 uint8 array."""
    arr = np.asarray(img, dtype=np.uint8)
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ValueError(f"a {w}x{h} image cannot be cropped to {size}x{size}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return np.array(arr[top:top + size, left:left + size], copy=True)


def to_chw(arr: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 -> float32 ``[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255.0)


@dataclass
class PairDataset(Dataset):
    """Content/style pairs; item ``(i, j, seed)`` is content i and style j, cropped with the
    random generator ``seed``, with the content's Laplacian when ``win_rad`` is set."""

    contents: list[str]
    styles: list[str]
    settings: Settings
    new_size: int
    crop: int
    win_rad: int | None = 1
    _storage: Any = field(default=None, init=False, repr=False)
    _bad: set[str] = field(default_factory=set, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_storage"] = None  # each process builds its own client
        return state

    def __len__(self) -> int:
        return len(self.contents)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            from ..storage import Storage

            self._storage = Storage(self.settings, confine_local=False)
        return self._storage

    def _read(self, uri: str) -> Image.Image:
        from ..images import decode_image

        data = self.storage.read(uri, self.settings.max_input_bytes)
        return decode_image(data, self.settings.max_pixels)

    def _load(self, uris: list[str], index: int, rng: np.random.Generator,
              bad: list[tuple[str, str]]) -> np.ndarray:
        """The crop of ``uris[index]``, or of another random image when it is unreadable."""
        for _ in range(MAX_REDRAWS):
            uri = uris[index]
            if uri not in self._bad:
                try:
                    img = resize_short_side(self._read(uri), self.new_size)
                    return random_crop(img, self.crop, rng)
                except (CapvstError, OSError, ValueError, Image.DecompressionBombError) as exc:
                    self._bad.add(uri)
                    bad.append((uri, str(getattr(exc, "message", None) or exc)))
            index = int(rng.integers(0, len(uris)))
        raise DataError(f"no readable image in {MAX_REDRAWS} draws among {len(uris)} files "
                        f"(e.g. {uris[0]}); check the folder")

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:  # type: ignore[override]
        ci, si, seed = key
        rng = np.random.default_rng(seed)
        bad: list[tuple[str, str]] = []
        content = self._load(self.contents, ci, rng, bad)
        style = self._load(self.styles, si, rng, bad)
        item: dict[str, Any] = {"content": to_chw(content), "style": to_chw(style), "bad": bad,
                                "lap": None}
        if self.win_rad:
            lap = matting_laplacian(content, win_rad=self.win_rad)
            item["lap"] = (torch.from_numpy(lap.indptr.astype(np.int32)),
                           torch.from_numpy(lap.indices.astype(np.int32)),
                           torch.from_numpy(lap.data.astype(np.float32)))
        return item


class PairSampler(Sampler):
    """Endless ``(content, style, seed)`` keys: each list in a fresh random order per pass,
    as the authors' infinite samplers; reproducible from ``(seed, start)``."""

    def __init__(self, n_contents: int, n_styles: int, seed: int, start: int = 0) -> None:
        self.n = (n_contents, n_styles)
        self.seed = seed
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, self.start])
        orders = [rng.permutation(n) for n in self.n]
        pos = [0, 0]
        while True:
            key = []
            for k in (0, 1):
                if pos[k] == self.n[k]:
                    orders[k] = rng.permutation(self.n[k])
                    pos[k] = 0
                key.append(int(orders[k][pos[k]]))
                pos[k] += 1
            yield key[0], key[1], int(rng.integers(0, 2**63 - 1))


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images; keep the per-image Laplacians and unreadable files as lists."""
    return {"content": torch.stack([i["content"] for i in items]),
            "style": torch.stack([i["style"] for i in items]),
            "lap": [i["lap"] for i in items],
            "bad": [b for i in items for b in i["bad"]]}


def _worker_init(_: int) -> None:
    # workers only stack small tensors; one thread each leaves the cores to the Laplacians
    torch.set_num_threads(1)


def default_workers(batch_size: int) -> int:
    """The authors' two loader workers per image of a batch, capped by the CPU count."""
    return max(1, min(2 * batch_size, os.cpu_count() or 1))


def make_loader(dataset: PairDataset, batch_size: int, seed: int, start: int,
                workers: int, pin_memory: bool = False) -> DataLoader:
    """An endless loader of batches; ``workers`` > 0 runs them in spawned processes."""
    sampler = PairSampler(len(dataset.contents), len(dataset.styles), seed, start)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"multiprocessing_context": "spawn", "persistent_workers": True,
                 "worker_init_fn": _worker_init, "prefetch_factor": 2}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, **extra)
