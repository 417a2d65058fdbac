"""Training data: recursive listing (local and S3), unreadable files, crops, Laplacians,
sampling, and loader processes that cannot inherit a broken OpenMP pool."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from capvst.settings import Settings
from capvst.storage import Storage
from capvst.training import matting_laplacian
from capvst.training.data import (
    DataError,
    PairDataset,
    PairSampler,
    list_images,
    resize_short_side,
)
from tests.data import image_bytes
from tests.services import REPO
from tests.training.helpers import image_folders


@pytest.fixture
def folders(tmp_path):
    return image_folders(tmp_path)


def _settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


def test_lists_recursively_and_ignores_other_files(folders):
    content, _ = folders
    uris = list_images(str(content), Storage(_settings(), confine_local=False))
    names = [u.rsplit("/", 1)[1] for u in uris]
    assert sorted(names) == ["broken.jpg", "c0.png", "c1.png", "c2.png", "empty.png"]
    assert uris == sorted(uris) and all(u.startswith("file://") for u in uris)


def test_empty_or_missing_folder(tmp_path):
    store = Storage(_settings(), confine_local=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DataError, match="no image files"):
            list_images(str(folder), store)


def test_resize_like_the_authors():
    img = Image.new("RGB", (56, 44))
    assert resize_short_side(img, 40).size == (50, 40)
    assert resize_short_side(img.transpose(Image.Transpose.ROTATE_90), 40).size == (40, 50)
    assert resize_short_side(img, 44) is img


def test_item_skips_unreadable_files_and_builds_the_laplacian(folders):
    content, style = folders
    store = Storage(_settings(), confine_local=False)
    contents, styles = list_images(str(content), store), list_images(str(style), store)
    ds = PairDataset(contents, styles, _settings(), new_size=40, crop=32, win_rad=1)
    broken = next(i for i, u in enumerate(contents) if u.endswith("broken.jpg"))
    item = ds[(broken, 0, 123)]
    assert item["content"].shape == (3, 32, 32) and item["style"].shape == (3, 32, 32)
    assert [u for u, _ in item["bad"]][0].endswith("broken.jpg")
    assert "not an image" in item["bad"][0][1]
    # the Laplacian is the crop's, exactly
    crop = (item["content"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    want = matting_laplacian(crop)
    crow, col, val = item["lap"]
    np.testing.assert_array_equal(crow.numpy(), want.indptr)
    np.testing.assert_array_equal(col.numpy(), want.indices)
    np.testing.assert_allclose(val.numpy(), want.data.astype(np.float32))
    # a known-bad file is not read again in this process, and not reported again
    assert ds[(broken, 0, 5)]["bad"] == []
    # the same key gives the same crops
    good = next(i for i, u in enumerate(contents) if u.endswith("c0.png"))
    a, b = ds[(good, 1, 9)], ds[(good, 1, 9)]
    assert torch.equal(a["content"], b["content"]) and torch.equal(a["style"], b["style"])
    assert not torch.equal(a["content"], ds[(good, 1, 10)]["content"])
    no_lap = PairDataset(contents, styles, _settings(), new_size=40, crop=32, win_rad=None)
    assert no_lap[(good, 0, 1)]["lap"] is None


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"")
    uris = list_images(str(tmp_path), Storage(_settings(), confine_local=False))
    ds = PairDataset(uris, uris, _settings(), new_size=16, crop=16)
    with pytest.raises(DataError, match="no readable image"):
        ds[(0, 0, 1)]


def test_sampler_passes_and_seeds():
    keys = [k for k, _ in zip(PairSampler(5, 3, seed=1), range(15))]
    for p in range(3):
        assert sorted(k[0] for k in keys[5 * p:5 * p + 5]) == list(range(5))
    assert sorted(k[1] for k in keys[:3]) == [0, 1, 2]
    again = [k for k, _ in zip(PairSampler(5, 3, seed=1), range(15))]
    assert keys == again
    resumed = [k for k, _ in zip(PairSampler(5, 3, seed=1, start=100), range(15))]
    assert resumed != keys


def test_reads_an_s3_prefix(moto_server, s3, bucket):
    for i in range(2):
        s3.put_object(Bucket=bucket, Key=f"train/a/c{i}.jpg",
                      Body=image_bytes((40, 36), seed=i, fmt="JPEG"))
    s3.put_object(Bucket=bucket, Key="train/b/deep/c2.PNG", Body=image_bytes((40, 36), seed=2))
    s3.put_object(Bucket=bucket, Key="train/b/bad.png", Body=b"nope")
    s3.put_object(Bucket=bucket, Key="train/list.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="other/c9.jpg", Body=image_bytes((40, 36), seed=9))
    settings = _settings(s3_endpoint_url=moto_server.url)
    uris = list_images(f"s3://{bucket}/train", Storage(settings, confine_local=False))
    assert uris == [f"s3://{bucket}/train/a/c0.jpg", f"s3://{bucket}/train/a/c1.jpg",
                    f"s3://{bucket}/train/b/bad.png", f"s3://{bucket}/train/b/deep/c2.PNG"]
    ds = PairDataset(uris, uris, settings, new_size=32, crop=32, win_rad=1)
    item = ds[(2, 3, 7)]
    assert item["content"].shape == (3, 32, 32) and item["lap"] is not None
    assert item["bad"][0][0] == f"s3://{bucket}/train/b/bad.png"


@pytest.mark.slow
def test_spawned_loader_after_parallel_torch_work_with_default_threads(folders):
    """The parent runs multi-threaded PyTorch (as the trainer does after loading the VGG and
    the network) and only then starts its loader processes: with forked workers that can
    block forever in OpenMP; spawned workers must deliver batches. Default thread settings."""
    content, style = folders
    script = textwrap.dedent(f"""
        import torch
        from capvst.settings import Settings
        from capvst.storage import Storage
        from capvst.training.data import PairDataset, list_images, make_loader
        assert torch.get_num_threads() >= 2, torch.get_num_threads()
        a = torch.rand(1500, 1500)
        (a @ a).sum().item()                     # starts the OpenMP pool in the parent
        torch.rand(4_000_000).clone().add_(1)    # a parallel elementwise region too
        s = Settings()
        store = Storage(s, confine_local=False)
        ds = PairDataset(list_images({str(content)!r}, store), list_images({str(style)!r}, store),
                         s, new_size=40, crop=32, win_rad=1)
        loader = make_loader(ds, batch_size=2, seed=0, start=0, workers=2)
        it = iter(loader)
        for _ in range(4):
            batch = next(it)
            x = batch["content"]
            (x.repeat(1, 1, 20, 20) * 2).sum().item()   # parallel work after the workers
        it._shutdown_workers()
        print("ok", loader.multiprocessing_context.get_start_method(), len(batch["lap"]))
    """)
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") and not k.startswith("CAPVST_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180, env=env, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "spawn", "2"]
