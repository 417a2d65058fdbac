"""The CAP-VSTNet network, its checkpoints and the cWCT transform (plain PyTorch)."""

from .checkpoint import LoadedModel, load_bytes, load_file, save_checkpoint, untrained
from .cwct import Moments, style_moments, transfer, transfer_masked
from .revnet import CONFIGS, MODES, Mode, NetConfig, RevNet, build_net

__all__ = [
    "CONFIGS", "MODES", "LoadedModel", "Mode", "Moments", "NetConfig", "RevNet", "build_net",
    "load_bytes", "load_file", "save_checkpoint", "style_moments", "transfer",
    "transfer_masked", "untrained",
]
