"""``capvst train`` options: the contract's names, help texts, defaults, and usage errors
answered before PyTorch is imported."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from capvst.cli import _parser, _run
from capvst.training.config import MODE_DEFAULTS, TrainConfig
from tests.services import REPO

OPTIONS = ["--mode", "--content", "--style", "--vgg", "--out", "--steps", "--fine-tune-steps",
           "--batch-size", "--new-size", "--crop", "--lr", "--lr-decay", "--style-weight",
           "--content-weight", "--lap-weight", "--rec-weight", "--temporal-weight",
           "--win-rad", "--resume", "--device", "--seed"]


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_exactly_the_contract_options_each_with_help():
    actions = [a for a in _train_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert sorted(o for a in actions for o in a.option_strings) == sorted(OPTIONS)
    assert all(a.help and len(a.help) > 10 for a in actions)


def test_defaults_are_the_authors_recipe(tmp_path):
    args = _train_parser().parse_args(["--mode", "photorealistic", "--content", "c", "--style",
                                       "s", "--vgg", "v", "--out", "o"])
    assert (args.steps, args.fine_tune_steps, args.batch_size, args.new_size, args.crop) == \
        (170_000, 10_000, 2, 512, 256)
    assert (args.lr, args.lr_decay, args.style_weight, args.content_weight,
            args.temporal_weight, args.win_rad) == (1e-4, 5e-5, 1.0, 0.0, 60.0, 1)
    photo = TrainConfig(mode="photorealistic", content="c", style="s", vgg="v", out="o")
    art = TrainConfig(mode="artistic", content="c", style="s", vgg="v", out="o")
    assert (photo.lap_weight, photo.rec_weight) == (1500.0, 10.0)
    assert (art.lap_weight, art.rec_weight) == (1.0, 1.0) == tuple(
        MODE_DEFAULTS["artistic"].values())
    assert photo.image_steps == 160_000
    explicit = TrainConfig(mode="artistic", content="c", style="s", vgg="v", out="o",
                           lap_weight=0.0)
    assert explicit.lap_weight == 0.0


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    (tmp_path / "vgg.pth").write_bytes(b"x")
    return tmp_path


def _argv(p, *extra):
    return ["train", "--mode", "photorealistic", "--content", str(p / "c"), "--style",
            str(p / "s"), "--vgg", str(p / "vgg.pth"), "--out", str(p / "out"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--crop", "30"], "--crop must be a multiple of 4"),
    (["--crop", "256", "--new-size", "200"], "--new-size must be at least --crop"),
    (["--steps", "10", "--fine-tune-steps", "11"],
     "--fine-tune-steps (11) must lie between 0 and --steps (10)"),
    (["--lr", "0"], "--lr must be positive"),
    (["--resume"], "--resume: no checkpoint at"),
])
def test_usage_errors(paths, capsys, extra, message):
    assert _run(_argv(paths, *extra), _parser) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--lap-weight", "-1"], ["--device", "tpu"], ["--steps", "0"], ["--mode", "anime"],
])
def test_bad_values(paths, capsys, argv):
    args = _argv(paths)
    if argv[0] == "--mode":
        args[2] = argv[1]
    else:
        args += argv
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(args)
    assert exc.value.code == 2


def test_missing_inputs_and_existing_run(paths, capsys):
    assert _run(_argv(paths)[:4] + [str(paths / "nope")] + _argv(paths)[5:], _parser) == 2
    assert "no such folder" in capsys.readouterr().err
    (paths / "vgg.pth").unlink()
    assert _run(_argv(paths), _parser) == 2
    assert "--vgg" in capsys.readouterr().err
    (paths / "vgg.pth").write_bytes(b"x")
    (paths / "out").mkdir()
    (paths / "out" / "checkpoint.pt").write_bytes(b"x")
    assert _run(_argv(paths), _parser) == 2
    assert "pass --resume to continue" in capsys.readouterr().err


def test_usage_errors_do_not_load_torch(paths):
    code = ("import sys\nfrom capvst.cli import _parser, _run\n"
            f"rc = _run({_argv(paths, '--crop', '30')!r}, _parser)\n"
            "print(rc, 'torch' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), timeout=60)
    assert out.stdout.split() == ["2", "False", "False"], out.stderr


def test_training_imports_no_service_libraries():
    code = ("import sys, capvst.training.trainer, capvst.training.data\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), timeout=60)
    loaded = set(out.stdout.split())
    assert "torch" in loaded and "scipy" in loaded, out.stderr
    assert not loaded & {"celery", "kombu", "redis", "boto3", "botocore"}
