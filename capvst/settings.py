"""Deployment settings, read from ``CAPVST_*`` environment variables (DESIGN.md §4).

Build one :class:`Settings` at an entry point (a command, the worker, the scheduler) and pass
it down; library code never reads the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .types import MODES, Mode


class Settings(BaseSettings):
    """Every knob of a capvst deployment; field ``x`` is read from ``CAPVST_X``."""

    # an empty variable means "not set" (compose and Kubernetes often pass empty strings)
    model_config = SettingsConfigDict(env_prefix="CAPVST_", extra="ignore", env_ignore_empty=True)

    broker_url: str = "redis://localhost:6379/0"
    s3_endpoint_url: str | None = None
    #: botocore retry attempts for S3 calls (the first call included).
    s3_max_attempts: int = Field(5, ge=1, le=20)
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    checkpoint_photorealistic: str | None = None
    checkpoint_artistic: str | None = None
    #: Optional integrity pins: the checkpoint's full sha256 must match.
    checkpoint_photorealistic_sha256: str | None = None
    checkpoint_artistic_sha256: str | None = None
    #: A stylize worker refuses to start when a mode it serves has no checkpoint, unless this
    #: is set: then it serves the seeded untrained network, and every report says so.
    allow_untrained: bool = False
    device: str = "auto"
    allowed_buckets: str | None = None
    local_root: Path | None = None
    task_time_limit: int = Field(1800, ge=1)
    visibility_timeout: int = Field(3600, ge=1)
    #: Inputs over this many pixels (width × height) fail with ``too_large``.
    max_pixels: int = Field(100_000_000, ge=16)
    #: Inputs over this many bytes fail with ``too_large`` before they are read.
    max_input_bytes: int = Field(200_000_000, ge=1)
    #: Precision of the transform's large passes over the features (its small
    #: factorisations are always float64); float32 is an approximation at the edge of the
    #: parity tolerance (docs/MODEL.md gives the measured error).
    transform_dtype: Literal["float64", "float32"] = "float64"
    #: Bytes one stylization may use; images that do not fit run in exact tiles (``--tile
    #: auto``). Unset: 80% of the free GPU memory, or 60% of the available RAM (cgroup
    #: limit included) on a CPU, measured when each image starts.
    memory_budget: int | None = Field(None, ge=1 << 26)
    #: The network's precision: float32 (TF32 off, matches the reference) or an opt-in faster
    #: one, tf32, bf16 or fp16 (CUDA; docs/PERFORMANCE.md gives each one's measured error).
    precision: Literal["float32", "tf32", "bf16", "fp16"] = "float32"
    #: Opt-in ``torch.compile`` of the network's whole-image passes (each new image size
    #: compiles again, which takes tens of seconds). Measured slower on a CPU
    #: (docs/PERFORMANCE.md); for GPUs serving images of a few fixed sizes, measure with
    #: ``bench/model.py --compile`` before turning it on.
    compile: bool = False
    #: Items with the same styles, options and resized size that go through the network
    #: together (1 turns batching off); memory on the device grows with it. Unset: 4 on a
    #: GPU, 1 on a CPU (where batches are slower per image).
    batch_size: int | None = Field(None, ge=1, le=256)
    #: Style statistics kept per worker process (least recently used are dropped).
    style_cache_size: int = Field(64, ge=0)
    #: Retries of a transient fault within one delivery, with exponential backoff.
    task_max_retries: int = Field(4, ge=0)
    #: Deliveries of one task before its items fail (a poison task that kills workers).
    max_deliveries: int = Field(3, ge=1)
    #: Items per stylize task (items sharing a style travel together).
    chunk_size: int = Field(8, ge=1, le=1000)
    #: Modes a worker loads at start.
    worker_modes: str = "photorealistic,artistic"
    #: First backoff of a transient retry in seconds; doubles per retry up to the maximum.
    retry_backoff: float = Field(1.0, ge=0.0)
    retry_backoff_max: float = Field(30.0, ge=0.0)
    #: Manifest lines the scheduler reads per expansion step.
    expand_slice_lines: int = Field(5000, ge=1)
    #: Expansion pauses while the stylize queue holds this many tasks (bounds Redis memory).
    max_queued_tasks: int = Field(2000, ge=1)
    #: Days a finished job's state stays in Redis (object storage keeps the report).
    job_ttl_days: float = Field(14.0, gt=0)
    #: Rows with thumbnails in index.html (failures first).
    report_rows: int = Field(100, ge=0)
    #: Intra-op threads per worker process; unset leaves PyTorch's default.
    torch_threads: int | None = Field(None, ge=1)
    #: Prometheus ``/metrics`` of a worker or the scheduler on this TCP port (unset: none).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # -- video items ---------------------------------------------------------------------
    #: Videos with more frames than this fail with ``too_large``.
    max_video_frames: int = Field(500_000, ge=1)
    #: Videos longer than this many seconds fail with ``too_large``.
    max_video_seconds: float = Field(4 * 3600.0, gt=0)
    #: Video files over this many bytes fail with ``too_large`` before they are read.
    max_video_bytes: int = Field(20_000_000_000, ge=1)
    #: Target length of a video segment (one task); cuts fall on the nearest keyframe.
    video_segment_seconds: float = Field(10.0, gt=0)
    #: Frame rate of a folder or prefix of frames (which carries none of its own).
    video_frames_fps: float = Field(25.0, gt=0, le=1000)

    # -- job engine: leases and the reconciler ------------------------------------------------
    #: A step or task run that has not renewed its lease for this long is presumed dead: the
    #: reconciler re-sends the step or hands the task back (seconds).
    lease_seconds: float = Field(60.0, ge=2.0)
    #: How often the scheduler's reconciler runs its repair pass (seconds).
    reconcile_interval: float = Field(5.0, gt=0.0)
    #: A throttled expansion step tries again after this long (seconds).
    throttle_seconds: float = Field(2.0, gt=0.0)

    # -- stylize worker pipeline ---------------------------------------------------------------
    #: Threads per worker process that fetch and decode the next items.
    fetch_threads: int = Field(4, ge=1, le=64)
    #: Threads per worker process that encode and upload finished images.
    encode_threads: int = Field(2, ge=1, le=64)
    #: Items in flight per worker process (fetched, on the device, or being written): bounds
    #: the memory of the pipeline. Batches form only from items in flight, so keep it at
    #: least twice ``batch_size``.
    inflight_items: int = Field(10, ge=1, le=256)
    #: Results are recorded in Redis in batches, at least this often (seconds).
    flush_seconds: float = Field(2.0, gt=0.0)
    #: Benchmarks only: replace the network by a pause of this many seconds per item (the
    #: output is the resized content), to measure how much I/O the pipeline hides.
    standin_model_seconds: float | None = Field(None, ge=0.0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError("CAPVST_VISIBILITY_TIMEOUT must exceed CAPVST_TASK_TIME_LIMIT, or a "
                             "running task is handed to a second worker")
        return self

    @property
    def bucket_allowlist(self) -> frozenset[str] | None:
        """Allowed buckets, or None when any bucket is allowed."""
        if not self.allowed_buckets or not self.allowed_buckets.strip():
            return None
        return frozenset(b.strip() for b in self.allowed_buckets.split(",") if b.strip())

    @property
    def soft_time_limit(self) -> int:
        """Soft limit: a little before the hard one so a task can clean up."""
        return max(1, self.task_time_limit - max(1, min(30, self.task_time_limit // 10)))

    @property
    def modes(self) -> tuple[Mode, ...]:
        """Modes listed in ``worker_modes``."""
        out: list[Mode] = []
        for m in self.worker_modes.split(","):
            m = m.strip()
            if m in MODES:
                out.append(m)  # type: ignore[arg-type]
            elif m:
                raise ValueError(f"unknown mode {m!r} in CAPVST_WORKER_MODES")
        return tuple(out)

    def checkpoint_for(self, mode: Mode) -> tuple[str | None, str | None]:
        """(checkpoint URI, expected sha256) configured for ``mode``."""
        if mode == "photorealistic":
            return self.checkpoint_photorealistic, self.checkpoint_photorealistic_sha256
        return self.checkpoint_artistic, self.checkpoint_artistic_sha256

    # --- high-availability broker: Redis Sentinel ---------------------------------------------
    #: Name of the master that the sentinels of a ``sentinel://`` broker URL monitor.
    sentinel_master: str | None = None
    #: Password of the sentinels themselves, when they require one (the master's password
    #: goes in the URL, as with ``redis://``).
    sentinel_password: str | None = None

    @property
    def uses_sentinel(self) -> bool:
        """Whether the broker URL names Redis Sentinels rather than a Redis server."""
        return self.broker_url.strip().lower().startswith("sentinel://")

    @model_validator(mode="after")
    def _sentinel(self) -> Settings:
        if self.uses_sentinel and not (self.sentinel_master or "").strip():
            raise ValueError("CAPVST_BROKER_URL names Redis Sentinels (sentinel://); set "
                             "CAPVST_SENTINEL_MASTER to the name of the master they monitor")
        return self
