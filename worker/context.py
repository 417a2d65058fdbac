"""A stylize worker process's resources, built once when the process starts (after the
fork) and handed to every task: settings, storage, the job store, the loaded models on the
device, and the thread pools of the pipeline."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from capvst.broker import Sender
from capvst.errors import ModelError
from capvst.jobs import JobStore, connect_settings
from capvst.metrics import WorkerMetrics
from capvst.settings import Settings
from capvst.storage import Storage
from capvst.types import Mode

if TYPE_CHECKING:
    from capvst.model.checkpoint import LoadedModel
    from capvst.stylize import Stylizer

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Per-process resources of a stylize worker."""

    settings: Settings
    storage: Storage
    jobs: JobStore
    send: Sender
    models: dict[Mode, LoadedModel]
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stylizers: dict[Mode, Stylizer] = field(default_factory=dict)
    fetch_pool: ThreadPoolExecutor | None = None
    encode_pool: ThreadPoolExecutor | None = None
    metrics: WorkerMetrics = field(default_factory=lambda: WorkerMetrics(False))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cache_seen: dict[Mode, tuple[int, int]] = field(default_factory=dict)

    def stylizer(self, mode: Mode) -> Stylizer:
        """The model of ``mode`` on this process's device."""
        with self._lock:
            if mode not in self.stylizers:
                if mode not in self.models:
                    raise ModelError(f"this worker does not serve mode {mode!r} "
                                     "(CAPVST_WORKER_MODES)")
                import torch

                from capvst.stylize import Stylizer

                s = self.settings
                dtype = torch.float64 if s.transform_dtype == "float64" else torch.float32
                # tiling is chosen per image by this worker's own device memory
                self.stylizers[mode] = Stylizer(self.models[mode], s.device, dtype,
                                                s.style_cache_size, s.memory_budget,
                                                s.precision, compile=s.compile)
            return self.stylizers[mode]

    def after_model(self, mode: Mode) -> None:
        """Metrics after an item left the device: style cache use, device memory."""
        if not self.metrics.enabled or mode not in self.stylizers:
            return
        st = self.stylizers[mode]
        hits, misses = st.cache_hits, st.cache_misses
        old_hits, old_misses = self._cache_seen.get(mode, (0, 0))
        self._cache_seen[mode] = (hits, misses)
        self.metrics.style_cache(hits - old_hits, misses - old_misses)
        self.metrics.device_memory(st.device_memory())

    def model_id(self, mode: Mode) -> str | None:
        """The id of the model serving ``mode`` (None when the mode is not served)."""
        m = self.models.get(mode)
        return m.model_id if m is not None else None


def build_context(settings: Settings, send: Sender, metrics: bool = False) -> WorkerContext:
    """Load the models, move them to the device, start the pools: one call per process.
    ``metrics``: record Prometheus metrics (the parent serves them)."""
    from capvst import load_model

    started = time.monotonic()

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = Storage(settings, confine_local=False)  # checkpoints are the operator's files
    models: dict[Mode, LoadedModel] = {}
    for mode in settings.modes:
        uri, pinned = settings.checkpoint_for(mode)
        models[mode] = load_model(mode, uri, expected_sha256=pinned, storage=store)
    jobs = JobStore(connect_settings(settings), int(settings.job_ttl_days * 86400),
                    settings.lease_seconds)
    ctx = WorkerContext(settings, Storage(settings), jobs, send, models,
                        fetch_pool=ThreadPoolExecutor(settings.fetch_threads,
                                                      thread_name_prefix="fetch"),
                        encode_pool=ThreadPoolExecutor(settings.encode_threads,
                                                       thread_name_prefix="encode"),
                        metrics=WorkerMetrics(metrics))
    for mode in models:
        st = ctx.stylizer(mode)
        log.info("%s model %s ready on %s", mode, st.model_id, st.device)
    ctx.metrics.model_load(time.monotonic() - started)
    for mode in models:
        ctx.after_model(mode)
    return ctx
