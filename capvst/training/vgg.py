"""The VGG-19 loss network of the style losses, loaded from a user's ``vgg_normalised.pth``.

The file is the plain ``nn.Sequential`` state dict that AdaIN-style training code (and
CAP-VSTNet's) loads: a 1×1 convolution 3→3 that maps [0, 1] RGB to the normalised input
VGG-19 was trained on, then the VGG-19 convolutions, each behind a 1-pixel reflection pad,
with ReLUs and 2×2 max pools. Keys are the sequence positions (``0.weight``, ``2.weight``,
``5.weight``, ...). Only the layers up to relu4_1 are used; the rest may be present or not.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

# The sequence of the published file: ("conv", in, out, kernel) | ("pad",) | ("relu",) |
# ("pool",). Comments name the ReLU outputs.
_LAYOUT: list[tuple] = [("conv", 3, 3, 1)]
for _block, (_cin, _cout, _n) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 4),
                                            (256, 512, 4), (512, 512, 4)]):
    for _i in range(_n):
        _LAYOUT += [("pad",), ("conv", _cin if _i == 0 else _cout, _cout, 3), ("relu",)]
    if _block < 4:
        _LAYOUT.append(("pool",))

#: Slices of the sequence ending at relu1_1, relu2_1, relu3_1 and relu4_1.
STAGES = ((0, 4), (4, 11), (11, 18), (18, 31))
#: Positions used for the losses (everything up to relu4_1).
USED = STAGES[-1][1]


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the published ``vgg_normalised.pth`` and its tensor shape."""
    out: dict[str, tuple[int, ...]] = {}
    for i, spec in enumerate(_LAYOUT):
        if spec[0] == "conv":
            _, cin, cout, k = spec
            out[f"{i}.weight"] = (cout, cin, k, k)
            out[f"{i}.bias"] = (cout,)
    return out


def _build(upto: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in _LAYOUT[:upto]:
        if spec[0] == "conv":
            layers.append(nn.Conv2d(spec[1], spec[2], spec[3]))
        elif spec[0] == "pad":
            layers.append(nn.ReflectionPad2d(1))
        elif spec[0] == "relu":
            layers.append(nn.ReLU())
        else:
            layers.append(nn.MaxPool2d(2, 2, 0, ceil_mode=True))
    return nn.Sequential(*layers)


def check_state_dict(sd: object, source: str = "the VGG file") -> dict[str, Tensor]:
    """The tensors needed up to relu4_1; CheckpointError naming what is wrong otherwise."""
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{source} holds no state dict; expected the plain VGG-19 "
                              "nn.Sequential state dict of vgg_normalised.pth (keys 0.weight, "
                              "0.bias, 2.weight, ...)")
    want = expected_shapes()
    got = {str(k).removeprefix("module."): v for k, v in sd.items()}
    needed = {k for k in want if int(k.split(".")[0]) < USED}
    missing = sorted(needed - set(got), key=lambda k: (int(k.split(".")[0]), k))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want)
                   if not isinstance(got[k], Tensor) or tuple(got[k].shape) != want[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]}, shape "
                         f"{want[missing[0]]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            shape = tuple(got[k].shape) if isinstance(got[k], Tensor) else type(got[k]).__name__
            parts.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {shape} instead "
                         f"of {want[k]})")
        raise CheckpointError(
            f"{source} is not a VGG-19 vgg_normalised.pth: " + "; ".join(parts)
            + ". Expected the nn.Sequential layout of the AdaIN / CAP-VSTNet training code: "
            "0 = 1x1 conv 3->3, then reflection-padded 3x3 convs at positions 2, 5, 9, 12, 16, "
            "19, 22, 25, 29, ... (conv1_1 is 2.weight of shape (64, 3, 3, 3))")
    return {k: got[k] for k in sorted(needed)}


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read and check a ``vgg_normalised.pth`` (tensors only: ``weights_only=True``)."""
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"VGG file not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"VGG path is a directory: {path}") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds pickled objects other than tensors (or is not a "
                              "PyTorch file); save the VGG state dict, not the module") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a PyTorch file ({type(exc).__name__})") from None
    return check_state_dict(obj, str(path))


def _mean_std(feat: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation (unbiased variance + eps), as AdaIN's."""
    flat = feat.flatten(2)
    return flat.mean(dim=2), (flat.var(dim=2) + eps).sqrt()


class VGGEncoder(nn.Module):
    """VGG-19 up to relu4_1, frozen; gives relu1_1, relu2_1, relu3_1 and relu4_1."""

    def __init__(self, state_dict: Mapping[str, Tensor]) -> None:
        super().__init__()
        body = _build(USED)
        body.load_state_dict(dict(state_dict), strict=True)
        self.stages = nn.ModuleList(body[a:b] for a, b in STAGES)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> VGGEncoder:
        """Load and check ``vgg_normalised.pth``."""
        return cls(load_state_dict(path))

    def features(self, x: Tensor) -> list[Tensor]:
        """relu1_1 … relu4_1 of ``x`` ``[B, 3, H, W]`` in [0, 1]."""
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def style_loss(self, stylized: list[Tensor], style: list[Tensor]) -> Tensor:
        """Sum over the four layers of MSE(mean) + MSE(std), as the authors' training."""
        total = stylized[0].new_zeros(())
        for a, b in zip(stylized, style):
            ma, sa = _mean_std(a)
            mb, sb = _mean_std(b)
            total = total + nn.functional.mse_loss(ma, mb) + nn.functional.mse_loss(sa, sb)
        return total

    @staticmethod
    def content_loss(stylized: list[Tensor], content: list[Tensor]) -> Tensor:
        """MSE between relu4_1 features."""
        return nn.functional.mse_loss(stylized[-1], content[-1])
