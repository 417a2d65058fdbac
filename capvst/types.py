"""Small shared types, importable without PyTorch (the scheduler and client never load it)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["photorealistic", "artistic"]
MODES: tuple[Mode, ...] = ("photorealistic", "artistic")
