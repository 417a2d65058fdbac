"""Training CAP-VSTNet: the authors' losses with the closed-form Matting Laplacian.

Plain PyTorch, numpy and scipy (``pip install capvst[train]``); image folders may be local or
``s3://`` prefixes (read through :mod:`capvst.storage`). ``capvst train`` is the command;
:func:`train` with a :class:`TrainConfig` is the same run as a library call. Names are
imported on first use, so that the command can check its options before loading PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MODE_DEFAULTS, TrainConfig, TrainingError
    from .cwct import CholeskyFailure
    from .laplacian import laplacian_loss, matting_laplacian
    from .trainer import train
    from .vgg import VGGEncoder

_WHERE = {
    "MODE_DEFAULTS": "config", "TrainConfig": "config", "TrainingError": "config",
    "CholeskyFailure": "cwct", "laplacian_loss": "laplacian", "matting_laplacian": "laplacian",
    "train": "trainer", "VGGEncoder": "vgg",
}
__all__ = ["MODE_DEFAULTS", "CholeskyFailure", "TrainConfig", "TrainingError", "VGGEncoder",
           "laplacian_loss", "matting_laplacian", "train"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
