"""Loading and saving checkpoints in the authors' format, safely.

The authors save ``{"state_dict": {...}}``. Both released configurations have identical tensor
shapes, so the mode of an authors' checkpoint cannot be read from it and must be given.
Checkpoints written by :func:`save_checkpoint` also carry ``{"capvst": {"mode": ...}}`` and are
refused in the other mode. Loading uses ``torch.load(weights_only=True)``: a pickle that
holds anything but tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import UNTRAINED  # noqa: E402  (one definition)
from ..errors import CheckpointError
from .revnet import MODES, Mode, RevNet, build_net

#: Seeds of the untrained fallback networks, fixed so every worker computes the same thing.
UNTRAINED_SEEDS: dict[Mode, int] = {"photorealistic": 0, "artistic": 1}


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference and where it came from."""

    net: RevNet
    mode: Mode
    model_id: str  # first 12 hex digits of the checkpoint's sha256, or "untrained"
    sha256: str | None


def model_id_of(data: bytes) -> tuple[str, str]:
    """(model id, full sha256) of checkpoint bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:12], digest


def _unwrap(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors)")
    found = obj.get("capvst")
    meta: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError("checkpoint's 'state_dict' is not a dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is not a tensor")
        # checkpoints saved from DataParallel / DistributedDataParallel
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out, dict(meta)


def _check_keys(net: RevNet, sd: Mapping[str, torch.Tensor]) -> None:
    want = net.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = sorted(k for k in set(want) & set(sd) if tuple(want[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(sd[k].shape)} "
                     f"instead of {tuple(want[k].shape)})")
    raise CheckpointError(
        "not a CAP-VSTNet checkpoint: " + "; ".join(parts)
        + ". Use one of the authors' released files (photo_image.pt, art_image.pt, ...) "
        "or one written by capvst"
    )


def load_bytes(data: bytes, mode: Mode, expected_sha256: str | None = None,
               map_location: str | torch.device = "cpu") -> LoadedModel:
    """Build the network of ``mode`` and load checkpoint bytes into it (strict)."""
    if mode not in MODES:
        raise CheckpointError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    model_id, digest = model_id_of(data)
    if expected_sha256 and digest != expected_sha256.strip().lower():
        raise CheckpointError(f"checkpoint sha256 is {digest}, expected {expected_sha256}; "
                              "the file is corrupt or not the one configured")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices from the safe unpickler
            obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln]
        if lines:
            raise CheckpointError("checkpoint contains pickled objects other than tensors and "
                                  f"was refused, nothing executed ({lines[0]})") from None
        raise CheckpointError("not a PyTorch checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"not a PyTorch checkpoint ({type(exc).__name__})") from None
    sd, meta = _unwrap(obj)
    saved_mode = meta.get("mode")
    if saved_mode is not None and saved_mode != mode:
        raise CheckpointError(f"checkpoint was saved for mode {saved_mode!r}, "
                              f"not {mode!r}; pass --mode {saved_mode}")
    net = build_net(mode)
    _check_keys(net, sd)
    net.load_state_dict(sd, strict=True)
    net.eval().requires_grad_(False)
    return LoadedModel(net, mode, model_id, digest)


def load_file(path: str | os.PathLike[str], mode: Mode,
              expected_sha256: str | None = None) -> LoadedModel:
    """Load a checkpoint from a local file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    return load_bytes(data, mode, expected_sha256)


def untrained(mode: Mode) -> LoadedModel:
    """The untrained network of ``mode``: PyTorch's default initialisation drawn right after
    seeding the global generator with :data:`UNTRAINED_SEEDS`, biases zeroed. These are the
    weights the reference data calls ``photorealistic-seed0`` and ``artistic-seed1``.
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(UNTRAINED_SEEDS[mode])
        net = build_net(mode)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.zero_()
    net.eval().requires_grad_(False)
    return LoadedModel(net, mode, UNTRAINED, None)


def save_checkpoint(net: RevNet, mode: Mode, path: str | os.PathLike[str],
                    extra: Mapping[str, Any] | None = None) -> str:
    """Write ``net`` in the authors' format plus capvst metadata; returns the model id."""
    meta: dict[str, Any] = {"mode": mode, **(extra or {})}
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "capvst": meta}, buf)
    data = buf.getvalue()
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return model_id_of(data)[0]
