"""Check a worker's checkpoints before it forks, without touching PyTorch in the caller.

A Celery prefork worker forks its pool processes from a parent. If that parent has run a
parallel PyTorch operation (``load_state_dict`` copies large tensors with an OpenMP loop),
the OpenMP thread pool exists in the parent but not in the forked child, and the child's
first parallel region blocks forever (GNU libgomp is not fork-safe). CUDA has the same rule.
So the parent proves the checkpoints load in a short-lived interpreter of its own and the
pool processes load them for real after the fork.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:
    from .settings import Settings
    from .types import Mode

#: Seconds a checkpoint check may take (an S3 download of two 16 MB files, two loads).
CHECK_TIMEOUT = 300.0


def untrained_modes(settings: Settings) -> list[Mode]:
    """Modes this worker serves that have no checkpoint configured."""
    return [m for m in settings.modes if not (settings.checkpoint_for(m)[0] or "").strip()]


def require_checkpoints(settings: Settings) -> list[Mode]:
    """Fail closed: raise :class:`CheckpointError` naming the settings when a served mode has
    no checkpoint, unless ``CAPVST_ALLOW_UNTRAINED`` is set; returns the modes that will run
    the untrained network (empty unless allowed)."""
    missing = untrained_modes(settings)
    if missing and not settings.allow_untrained:
        names = " and ".join(f"CAPVST_CHECKPOINT_{m.upper()}" for m in missing)
        which = "checkpoint" if len(missing) == 1 else "checkpoints"
        raise CheckpointError(
            f"no checkpoint for {' and '.join(missing)} ({names} unset), and a worker does "
            f"not serve an untrained network by accident: set {names} to the authors' "
            f"{which} (README.md, \"Checkpoints\"), limit CAPVST_WORKER_MODES to the modes "
            "you have, or set CAPVST_ALLOW_UNTRAINED=1 to serve the seeded untrained network "
            "on purpose (its outputs are not stylizations; reports say untrained)")
    return missing


def check_models(settings: Settings) -> dict[str, str]:
    """Check the device and load every mode this worker serves that has a checkpoint, on
    the CPU; ``{mode: model id}`` (``untrained`` for a mode without one). Raises
    :class:`CheckpointError` (or another capvst error) when one cannot be used."""
    from . import UNTRAINED, load_model
    from .storage import Storage
    from .stylize import resolve_device

    resolve_device(settings.device)  # a worker told to use a GPU it lacks stops here
    store = Storage(settings, confine_local=False)  # checkpoints are the operator's files
    out: dict[str, str] = {}
    for mode in settings.modes:
        uri, pinned = settings.checkpoint_for(mode)
        if not (uri or "").strip():
            out[mode] = UNTRAINED  # nothing to prove: the seeded network always builds
            continue
        out[mode] = load_model(mode, uri, expected_sha256=pinned, storage=store,
                               warn=False).model_id
    return out


def check_models_isolated(settings: Settings, timeout: float = CHECK_TIMEOUT
                          ) -> dict[str, str]:
    """:func:`check_models` in a fresh interpreter, so this process starts no thread pool,
    no CUDA context and no S3 connection pool that a later fork would inherit."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "from capvst.preflight import _main; _main()"],
            input=settings.model_dump_json(), capture_output=True, text=True,
            timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"checking the checkpoints took over {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode == 0 and isinstance(answer.get("models"), dict):
        return {str(k): str(v) for k, v in answer["models"].items()}
    message = answer.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise CheckpointError(str(message))


def _main() -> None:
    """Entry point of the isolated check: settings JSON on stdin, one JSON line out."""
    from .errors import CapvstError
    from .settings import Settings

    try:
        settings = Settings.model_validate_json(sys.stdin.read())
        print(json.dumps({"models": check_models(settings)}))
    except CapvstError as exc:
        print(json.dumps({"error": exc.message}))
        sys.exit(1)
    except Exception as exc:  # report anything else the same way: the caller refuses to start
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
