"""Small shared types, importable without PyTorch (the scheduler and client never load it)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["photorealistic", "artistic"]
MODES: tuple[Mode, ...] = ("photorealistic", "artistic")

#: Manifest formats ``capvst-submit --manifest-format`` accepts.
SubmitFormat = Literal["jsonl", "csv", "s3-batch", "s3-inventory"]
SUBMIT_FORMATS: tuple[SubmitFormat, ...] = ("jsonl", "csv", "s3-batch", "s3-inventory")
