"""One model for an item's outcome: a line of ``report.jsonl`` (DESIGN.md §6).

Workers, the scheduler (lines that never reach a worker) and the report writer all build
and read :class:`ItemResult`. The report's keys and their order are fixed; ``finished_at``
is internal bookkeeping (which of two results of one line is newer) and never reaches the
report.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import UNTRAINED
from .manifest import Item, ItemError

Status = Literal["succeeded", "skipped", "failed"]
#: Precedence of statuses: a line's best result wins; equal ones, the newer.
RANK: dict[str, int] = {"failed": 1, "skipped": 2, "succeeded": 3}
REPORT_KEYS = ("line", "id", "content", "style", "output", "status", "error", "attempts",
               "seconds", "worker", "model")
#: Keys a video item's line adds after :data:`REPORT_KEYS` (absent on image lines).
VIDEO_KEYS = ("frames", "segments", "warping_error", "video_seconds")


class ErrorInfo(BaseModel):
    """The report's ``error`` object."""

    model_config = ConfigDict(extra="ignore")
    code: str
    message: str


class ItemResult(BaseModel):
    """The outcome of one manifest line."""

    model_config = ConfigDict(extra="ignore")
    line: int = Field(ge=1)
    id: str | None = None
    content: str | None = None
    style: str | list[str] | None = None
    output: str | None = None
    status: Status
    error: ErrorInfo | None = None
    attempts: int = 0
    seconds: float = 0.0
    worker: str | None = None
    model: str | None = None
    mode: str | None = None
    #: Video items only: frames and segments of the output, the mean warping error between
    #: consecutive output frames (None when no pair could be measured), and seconds per
    #: stage summed over the segments (decode, model, warp, encode) plus the join.
    frames: int | None = None
    segments: int | None = None
    warping_error: float | None = None
    video_seconds: dict[str, float] | None = None
    #: The mix's weights as the manifest gave them (None: equal); shown by index.html.
    style_weights: list[float] | None = None
    finished_at: float = Field(default_factory=time.time)

    @classmethod
    def of_item(cls, item: Item, status: Status, *, code: str | None = None,
                message: str = "", attempts: int = 0, seconds: float = 0.0,
                worker: str | None = None, model: str | None = None) -> ItemResult:
        """A result for a validated item."""
        return cls(line=item.line, id=item.id, content=item.content, style=item.style_field,
                   output=item.output, status=status,
                   error=ErrorInfo(code=code, message=message) if code else None,
                   attempts=attempts, seconds=round(seconds, 4), worker=worker, model=model,
                   mode=item.mode, style_weights=item.style_weights)

    @classmethod
    def of_error(cls, err: ItemError | Item, code: str, message: str) -> ItemResult:
        """A failed result for a line that never reached a worker."""
        if isinstance(err, Item):
            return cls.of_item(err, "failed", code=code, message=message)
        return cls(line=err.line, id=err.id, content=err.content, style=err.style,
                   output=err.output, status="failed",
                   error=ErrorInfo(code=code, message=message))

    @property
    def code(self) -> str | None:
        """The error code, if any."""
        return self.error.code if self.error else None

    @property
    def untrained(self) -> bool:
        """Whether the seeded untrained network computed this result."""
        return self.model == UNTRAINED

    def weights(self) -> list[float]:
        """The normalised weight of each style (equal when the manifest gave none)."""
        styles = self.style if isinstance(self.style, list) else [self.style]
        w = self.style_weights
        if not w or len(w) != len(styles) or sum(w) <= 0:
            return [1.0 / len(styles)] * len(styles)
        total = float(sum(w))
        return [x / total for x in w]

    @property
    def rank(self) -> int:
        """Precedence of the status (higher wins)."""
        return RANK[self.status]

    def better_than(self, other: ItemResult) -> bool:
        """Whether this result replaces ``other`` for the same line."""
        return (self.rank, self.finished_at) > (other.rank, other.finished_at)

    def to_json(self) -> str:
        """The stored form (report keys plus internal bookkeeping), ASCII-safe."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=True)

    def report_line(self) -> dict[str, Any]:
        """The report's dict, in the report's key order."""
        d = self.model_dump(mode="json")
        line = {k: d.get(k) for k in REPORT_KEYS}
        if self.frames is not None or self.segments is not None:
            line.update({k: d.get(k) for k in VIDEO_KEYS})
        return line

    @classmethod
    def from_json(cls, text: str | bytes) -> ItemResult:
        """Parse a stored result (Python's JSON reader: it keeps lone surrogates that a
        manifest line may carry, where stricter readers refuse them)."""
        return cls.model_validate(json.loads(text))


def throughput(done: int, started: float | None, finished: float | None) -> float:
    """Items per second between ``started`` and ``finished`` (or now), rounded to 4
    decimals: the one way every place computes a job's rate (``capvst status``, the
    progress line and ``summary.json`` show the same number for a finished job)."""
    if not done or started is None:
        return 0.0
    end = finished if finished is not None else time.time()
    return round(done / max(end - started, 1e-3), 4)


def job_started(started: float | str | None, created: float | str | None) -> float:
    """When a job's rate clock starts: its first expansion step, else its creation."""
    for v in (started, created):
        if v not in (None, ""):
            return float(v)  # type: ignore[arg-type]
    return time.time()


def eta_seconds(done: int, total: int | None, rate: float, final: bool) -> float | None:
    """Seconds left, or None until it means something: the total known (expansion
    finished), at least one item done, a positive rate and work left."""
    if final or total is None or done <= 0 or rate <= 0 or done >= total:
        return None
    return round((total - done) / rate, 1)
