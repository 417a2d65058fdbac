"""capvst: batch photorealistic and artistic style transfer with CAP-VSTNet.

Public API: :func:`load_model` and :class:`Stylizer` (imported on first use, so that the
scheduler and the job client never load PyTorch). The model itself lives in
:mod:`capvst.model` and is plain PyTorch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .types import MODES, Mode

if TYPE_CHECKING:
    from .model.checkpoint import LoadedModel
    from .storage import Storage
    from .stylize import Stylizer

__version__ = "0.1.0"
__all__ = ["MODES", "UNTRAINED", "LoadedModel", "Mode", "Stylizer", "__version__", "load_model"]

UNTRAINED = "untrained"
log = logging.getLogger("capvst")


def __getattr__(name: str) -> Any:
    if name == "Stylizer":
        from .stylize import Stylizer

        return Stylizer
    if name == "LoadedModel":
        from .model.checkpoint import LoadedModel

        return LoadedModel
    raise AttributeError(name)


def untrained_warning(mode: Mode) -> str:
    """The loud message for an unconfigured checkpoint."""
    from .model.checkpoint import UNTRAINED_SEEDS

    env = f"CAPVST_CHECKPOINT_{mode.upper()}"
    return (f"WARNING: no {mode} checkpoint configured ({env} or --checkpoint); using an "
            f"UNTRAINED network (seed {UNTRAINED_SEEDS[mode]}): outputs are not real "
            "stylizations and reports say model=untrained")


def load_model(mode: Mode, checkpoint: str | None = None, *, expected_sha256: str | None = None,
               storage: Storage | None = None, warn: bool = True) -> LoadedModel:
    """Load the network of ``mode`` from a path, ``file://`` or ``s3://`` checkpoint.

    ``checkpoint=None`` gives the seeded untrained network, with a loud warning (logged
    unless ``warn`` is false, for callers that print it themselves).
    """
    from .errors import CapvstError, CheckpointError
    from .model.checkpoint import load_bytes, untrained

    if checkpoint is None or not str(checkpoint).strip():
        if warn:
            log.warning(untrained_warning(mode))
        return untrained(mode)
    from .settings import Settings
    from .storage import Storage as _Storage

    store = storage or _Storage(Settings(), confine_local=False)
    try:
        data = store.read(checkpoint)
    except CapvstError as exc:
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {exc.message}") from None
    return load_bytes(data, mode, expected_sha256)
