"""The training loop of CAP-VSTNet: the authors' recipe, resumable, with a log and samples.

One step (``train.py`` of the authors' release): encode content and style, cWCT, decode the
stylized image; style loss (and optional content loss) on VGG-19 features; cycle
reconstruction (encode the stylized image, transfer back to the content's statistics, decode,
L1 to the content); the Matting Laplacian gradient of the stylized image, scaled by its
weight and clamped to ±0.05, pushed straight into the stylized image's backward pass; in the
last ``fine_tune_steps`` steps the temporal loss on a synthetic second frame. Adam with
``lr / (1 + lr_decay · step)``, gradients clipped to norm 5.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import CheckpointError
from ..model.revnet import RevNet, build_net
from ..types import Mode
from . import cwct
from .config import TrainConfig, TrainingError
from .data import PairDataset, default_workers, list_images, make_loader
from .laplacian import csr_tensor, laplacian_loss
from .temporal import second_frame, temporal_loss
from .vgg import VGGEncoder

if TYPE_CHECKING:
    from ..settings import Settings

#: The authors' clamp of the scaled Laplacian gradient, and of the gradient norm.
LAP_GRAD_CLAMP = 0.05
GRAD_CLIP_NORM = 5.0
CHECKPOINT = "checkpoint.pt"
IMAGE_CHECKPOINT = "checkpoint_image.pt"
LOG = "log.jsonl"
SUMMARY = "summary.json"
COMPONENTS = ("style", "content", "rec", "lap", "temporal")


@dataclass
class Counters:
    """What went wrong without stopping the run."""

    cholesky: int = 0
    nonfinite: int = 0
    unreadable: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def write_atomic(path: str, data: bytes) -> None:
    """Write a whole file or leave the old one: temporary file, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, net: RevNet, mode: Mode, step: int, stage: str,
                    config: TrainConfig, optimizer: torch.optim.Optimizer | None) -> str:
    """The authors' ``{"state_dict": …}`` plus capvst's metadata (and the optimizer state and
    step for ``--resume``); loadable with ``weights_only=True``. Returns the sha256."""
    obj: dict[str, Any] = {
        "state_dict": _cpu(net.state_dict()),
        "capvst": {"mode": mode, "step": step, "stage": stage, "format": 1,
                   "config": {k: v for k, v in asdict(config).items()
                              if isinstance(v, (str, int, float, bool)) or v is None}},
    }
    if optimizer is not None:
        obj["optimizer"] = _cpu(optimizer.state_dict())
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def load_resume(path: str, mode: Mode) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, checked for ``--resume``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"--resume: no checkpoint at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"--resume: {path} is not a readable checkpoint "
                              f"({type(exc).__name__})") from None
    meta = obj.get("capvst") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or "step" not in meta or "optimizer" not in obj:
        raise CheckpointError(f"--resume: {path} was not written by capvst train (no optimizer "
                              "state or step)")
    if meta.get("mode") != mode:
        raise TrainingError(f"--resume: {path} is a {meta.get('mode')} checkpoint; pass "
                            f"--mode {meta.get('mode')}")
    return dict(obj)


def init_net(mode: Mode) -> RevNet:
    """A fresh network, initialised as the authors' (PyTorch defaults, zero biases)."""
    net = build_net(mode)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    return net


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """Weighted loss components of one step and what sample images need."""

    losses: dict[str, float]
    stylized: Tensor
    rec: Tensor | None


def train_step(net: RevNet, vgg: VGGEncoder, cfg: TrainConfig, content: Tensor, style: Tensor,
               laps: list[Tensor] | None, video: bool, rng: np.random.Generator) -> StepResult:
    """Forward and backward of one batch (gradients accumulate in ``net``; the caller steps).

    Raises :class:`cwct.CholeskyFailure` when a transform cannot factorise its covariance.
    """
    assert cfg.lap_weight is not None and cfg.rec_weight is not None
    z_c = net(content)
    z_s = net(style)
    stylized = net.inverse(cwct.transfer(z_c, z_s))

    feats = vgg.features(stylized)
    with torch.no_grad():
        style_feats = vgg.features(style)
    loss_s = vgg.style_loss(feats, style_feats)
    zero = stylized.new_zeros(())
    loss_c = zero
    if cfg.content_weight > 0:
        with torch.no_grad():
            content_feats = vgg.features(content)
        loss_c = vgg.content_loss(feats, content_feats)

    rec = None
    loss_rec = zero
    if cfg.rec_weight > 0:
        rec = net.inverse(cwct.transfer(net(stylized), z_c))
        loss_rec = nn.functional.l1_loss(rec, content)

    loss_lap = zero
    if cfg.lap_weight > 0 and laps is not None:
        values, grads = [], []
        for i, lap in enumerate(laps):
            value, grad = laplacian_loss(stylized[i], lap)
            values.append(value)
            grads.append(grad)
        grad = (torch.stack(grads) * cfg.lap_weight).clamp(-LAP_GRAD_CLAMP, LAP_GRAD_CLAMP)
        # the authors backpropagate the clamped gradient itself, not a loss
        stylized.backward(grad, retain_graph=True)
        loss_lap = torch.stack(values).mean().detach()

    loss_t = zero
    if video and cfg.temporal_weight > 0:
        second, flow = second_frame(content, rng)
        stylized2 = net.inverse(cwct.transfer(net(second), z_s))
        loss_t = temporal_loss(stylized, stylized2, flow)

    total = (cfg.style_weight * loss_s + cfg.content_weight * loss_c
             + cfg.rec_weight * loss_rec + cfg.temporal_weight * loss_t)
    parts = {"style": (cfg.style_weight, loss_s), "content": (cfg.content_weight, loss_c),
             "rec": (cfg.rec_weight, loss_rec), "lap": (cfg.lap_weight, loss_lap),
             "temporal": (cfg.temporal_weight, loss_t)}
    losses = {k: w * float(v.detach()) for k, (w, v) in parts.items()}
    losses["loss"] = sum(losses.values())
    if not np.isfinite(losses["loss"]):
        return StepResult(losses, stylized.detach(), None)
    if total.requires_grad:
        total.backward()
    return StepResult(losses, stylized.detach(), None if rec is None else rec.detach())


# ---------------------------------------------------------------------------------------------
# output: log, samples, progress
# ---------------------------------------------------------------------------------------------
def _grid(rows: list[Tensor]) -> Image.Image:
    """Rows of ``[B, 3, H, W]`` images in [0, 1] side by side, one row per tensor."""
    lines = [torch.cat(list(r.detach().float().cpu().clamp(0, 1)), dim=2) for r in rows]
    img = torch.cat(lines, dim=1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(img)


def write_sample(folder: str, step: int, rows: list[Tensor]) -> str:
    """``samples/step_XXXXXXXX.jpg``: content, style, stylized and reconstruction rows."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.jpg")
    buf = io.BytesIO()
    _grid(rows).save(buf, format="JPEG", quality=90)
    write_atomic(path, buf.getvalue())
    return path


def _truncate_log(path: str, upto: int) -> None:
    """Drop log lines past the checkpoint a resumed run starts from."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if int(json.loads(line)["step"]) <= upto:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_atomic(path, "".join(keep).encode())


class Reporter:
    """A rich progress bar on a terminal, or a plain line every ``every`` seconds."""

    def __init__(self, style: str, total: int, start: int, every: float = 10.0) -> None:
        self.style = style
        self.every = every
        self.total = total
        self._last = 0.0
        self._bar: Any = None
        if style == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[detail]}"),
                                 console=Console(file=sys.stderr))
            self._task = self._bar.add_task("training", total=total, completed=start, detail="")
            self._bar.start()

    def say(self, message: str) -> None:
        """A message above the bar, or a line on stderr."""
        if self.style == "none":
            return
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def update(self, step: int, stage: str, losses: dict[str, float] | None) -> None:
        detail = ""
        if losses:
            detail = f"loss {losses['loss']:.4g} " + " ".join(
                f"{k} {losses[k]:.3g}" for k in COMPONENTS if losses[k])
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=f"training ({stage})",
                             detail=detail)
            return
        now = time.monotonic()
        if self.style == "lines" and (step == self.total or now - self._last >= self.every):
            self._last = now
            print(f"step {step}/{self.total} ({stage}) {detail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@contextmanager
def _loader_iter(loader: Any, needed: bool) -> Iterator[Iterator[dict[str, Any]]]:
    if not needed:  # nothing to train: start no loader processes
        yield iter(())
        return
    it = iter(loader)
    try:
        yield it
    finally:
        # stop persistent workers now rather than at interpreter exit
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def train(cfg: TrainConfig, settings: Settings, progress: str = "lines",
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training into ``cfg.out``; returns the summary also written to
    ``summary.json``. ``progress``: ``bar``, ``lines`` or ``none``."""
    from ..storage import Storage
    from ..stylize import resolve_device

    cfg.check()
    assert cfg.lap_weight is not None and cfg.rec_weight is not None
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    log_path = os.path.join(cfg.out, LOG)
    if os.path.exists(ckpt_path) and not cfg.resume:
        raise TrainingError(f"{ckpt_path} exists; pass --resume to continue that run or choose "
                            "another --out")
    device = resolve_device(cfg.device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    store = Storage(settings, confine_local=False)
    contents = list_images(cfg.content, store)
    styles = list_images(cfg.style, store)
    vgg = VGGEncoder.from_file(cfg.vgg).to(device)

    torch.manual_seed(cfg.seed)
    net = init_net(cfg.mode)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    start = 0
    if cfg.resume:
        saved = load_resume(ckpt_path, cfg.mode)
        net.load_state_dict(saved["state_dict"], strict=True)
        start = int(saved["capvst"]["step"])
        _truncate_log(log_path, start)
    net.to(device).train()
    if cfg.resume:
        optimizer.load_state_dict(saved["optimizer"])  # after .to(): state follows the params
        del saved
    elif os.path.exists(log_path):
        os.unlink(log_path)  # a fresh run in a folder with an old log but no checkpoint

    workers = default_workers(cfg.batch_size) if cfg.workers is None else cfg.workers
    dataset = PairDataset(contents, styles, settings, cfg.new_size, cfg.crop,
                          cfg.win_rad if cfg.lap_weight > 0 else None)
    loader = make_loader(dataset, cfg.batch_size, cfg.seed, start, workers,
                         pin_memory=device.type == "cuda")
    rng = np.random.default_rng([cfg.seed, start, 1])
    counters = Counters()
    report = Reporter(progress, cfg.steps, start)
    report.say(f"training {cfg.mode} on {device}: {len(contents)} content and {len(styles)} "
               f"style image files, steps {start}..{cfg.steps} (video stage from "
               f"{cfg.image_steps}), {workers} loader processes")
    t0 = time.monotonic()
    step = completed = start
    sha = None
    last: StepResult | None = None
    batch: dict[str, Any] = {}
    stage = "image"
    try:
        with _loader_iter(loader, start < cfg.steps) as batches, \
                open(log_path, "a", encoding="utf-8") as log:
            while step < cfg.steps:
                batch = next(batches)
                for uri, why in batch["bad"]:
                    if uri not in counters.unreadable:
                        counters.unreadable.add(uri)
                        report.say(f"skipping unreadable file {uri}: {why}")
                content = batch["content"].to(device, non_blocking=True)
                style = batch["style"].to(device, non_blocking=True)
                laps = None
                if cfg.lap_weight > 0:
                    n = content.shape[2] * content.shape[3]
                    laps = [csr_tensor(crow, col, val, n, device)
                            for crow, col, val in batch["lap"]]
                stage = "video" if step >= cfg.image_steps else "image"
                lr = cfg.lr / (1.0 + cfg.lr_decay * step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                step += 1
                try:
                    last = train_step(net, vgg, cfg, content, style, laps, stage == "video", rng)
                except cwct.CholeskyFailure as exc:
                    counters.cholesky += 1
                    optimizer.zero_grad(set_to_none=True)
                    report.say(f"step {step}: batch skipped, {exc} "
                               f"({counters.cholesky} skipped so far)")
                    last = None
                else:
                    norm = nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP_NORM)
                    if np.isfinite(last.losses["loss"]) and bool(torch.isfinite(norm)):
                        optimizer.step()
                    else:
                        counters.nonfinite += 1
                        optimizer.zero_grad(set_to_none=True)
                        report.say(f"step {step}: batch skipped, non-finite loss or gradient")
                        last = None
                completed = step
                if last is not None and (step % cfg.interval == 0 or step == cfg.steps):
                    line = {"step": step, "loss": last.losses["loss"],
                            **{k: last.losses[k] for k in COMPONENTS},
                            "lr": lr, "stage": stage,
                            "seconds": round(time.monotonic() - t0, 3),
                            "skipped_cholesky": counters.cholesky,
                            "skipped_nonfinite": counters.nonfinite,
                            "unreadable_files": len(counters.unreadable)}
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    if on_step is not None:
                        on_step(step, last.losses)
                report.update(step, stage, last.losses if last else None)
                if last is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
                    rows = [batch["content"], batch["style"], last.stylized]
                    if last.rec is not None:
                        rows.append(last.rec)
                    write_sample(os.path.join(cfg.out, "samples"), step, rows)
                if step == cfg.image_steps and cfg.fine_tune_steps > 0:
                    save_checkpoint(os.path.join(cfg.out, IMAGE_CHECKPOINT), net, cfg.mode, step,
                                    "image", cfg, None)
                    report.say(f"image stage done: {os.path.join(cfg.out, IMAGE_CHECKPOINT)}")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    sha = save_checkpoint(ckpt_path, net, cfg.mode, step, stage, cfg, optimizer)
    except KeyboardInterrupt:
        if completed > start:  # a step cut short is not saved as done
            save_checkpoint(ckpt_path, net, cfg.mode, completed, stage, cfg, optimizer)
            report.say(f"interrupted: saved step {completed} to {ckpt_path}; --resume continues")
        report.close()
        raise
    report.close()
    seconds = time.monotonic() - t0
    if sha is None:  # nothing to do: already at --steps
        with open(ckpt_path, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
    summary = {
        "mode": cfg.mode, "checkpoint": os.path.abspath(ckpt_path), "sha256": sha,
        "model_id": sha[:12], "start_step": start, "step": step, "steps_run": step - start,
        "seconds": round(seconds, 3),
        "steps_per_second": round((step - start) / seconds, 4) if seconds > 0 else None,
        "device": str(device), "batch_size": cfg.batch_size, "crop": cfg.crop,
        "skipped_cholesky": counters.cholesky, "skipped_nonfinite": counters.nonfinite,
        "unreadable_files": sorted(counters.unreadable),
    }
    write_atomic(os.path.join(cfg.out, SUMMARY), (json.dumps(summary, indent=2) + "\n").encode())
    return summary
