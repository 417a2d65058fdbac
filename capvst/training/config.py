"""Options of a training run (light: no PyTorch, so the command checks them first)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CapvstError
from ..types import MODES, Mode

#: Per-mode defaults of the authors' README: the artistic model is trained with
#: ``--lap_weight 1 --rec_weight 1``.
MODE_DEFAULTS: dict[Mode, dict[str, float]] = {
    "photorealistic": {"lap_weight": 1500.0, "rec_weight": 10.0},
    "artistic": {"lap_weight": 1.0, "rec_weight": 1.0},
}


class TrainingError(CapvstError):
    """Training cannot start or go on (bad options, output folder, data or checkpoint)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; defaults are the authors' recipe."""

    mode: Mode
    content: str
    style: str
    vgg: str
    out: str
    steps: int = 170_000
    fine_tune_steps: int = 10_000
    batch_size: int = 2
    new_size: int = 512
    crop: int = 256
    lr: float = 1e-4
    lr_decay: float = 5e-5
    style_weight: float = 1.0
    content_weight: float = 0.0
    lap_weight: float | None = None  # None: the mode's default
    rec_weight: float | None = None  # None: the mode's default
    temporal_weight: float = 60.0
    win_rad: int = 1
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    #: Loader processes (None: two per image of a batch, at most one per CPU; 0: in-process).
    workers: int | None = None
    #: Log every this many steps (None: every step below 1000 steps, else every 10).
    log_every: int | None = None
    save_every: int = 1000
    sample_every: int = 1000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TrainingError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name, value in MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        """TrainingError for values that cannot work."""
        problems = []
        if self.steps < 1:
            problems.append("--steps must be at least 1")
        if not 0 <= self.fine_tune_steps <= self.steps:
            problems.append(f"--fine-tune-steps ({self.fine_tune_steps}) must lie between 0 and "
                            f"--steps ({self.steps}); the video stage is the last "
                            "--fine-tune-steps of --steps (0: an image model only)")
        if self.batch_size < 1:
            problems.append("--batch-size must be at least 1")
        if self.crop < 8 or self.crop % 4:
            problems.append("--crop must be a multiple of 4, at least 8 (the network halves "
                            "the image twice)")
        if self.new_size < self.crop:
            problems.append("--new-size must be at least --crop (the crop is taken from the "
                            "resized image)")
        if self.win_rad < 1:
            problems.append("--win-rad must be at least 1")
        if not (self.lr > 0 and self.lr_decay >= 0):
            problems.append("--lr must be positive and --lr-decay non-negative")
        weights = {"style": self.style_weight, "content": self.content_weight,
                   "lap": self.lap_weight, "rec": self.rec_weight,
                   "temporal": self.temporal_weight}
        if any(not (w is not None and w >= 0) for w in weights.values()):
            problems.append("loss weights must be non-negative")
        if problems:
            raise TrainingError("; ".join(problems))

    @property
    def image_steps(self) -> int:
        """Steps of the image stage; the rest is the video fine-tuning stage."""
        return self.steps - self.fine_tune_steps

    @property
    def interval(self) -> int:
        """Steps between log lines."""
        if self.log_every:
            return self.log_every
        return 1 if self.steps < 1000 else 10


