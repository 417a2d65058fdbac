"""Prometheus metrics of the stylize workers and the scheduler (``CAPVST_METRICS_PORT``).

Both services are Celery prefork workers: a parent process forks the pool processes that run
the tasks. prometheus_client's multiprocess mode aggregates them: the parent points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before it forks (:func:`serve`), every pool
process writes its samples to memory-mapped files there, and the parent's ``/metrics``
merges the files at each scrape. Counters and histograms of a pool process that died are
kept (a counter never goes backwards); its gauges are dropped (``mark_process_dead``), both
when it exits cleanly and, for one that was killed, at the next scrape.

The names are a contract with dashboards and autoscalers (docs/DEPLOY.md, ``deploy/``):

- workers: ``capvst_items_total{mode,status,code}``, ``capvst_stage_seconds{stage}``,
  ``capvst_model_load_seconds``, ``capvst_style_cache_hits_total``,
  ``capvst_style_cache_misses_total``, ``capvst_device_memory_bytes``;
- the scheduler: ``capvst_jobs{state}`` (read from Redis at each scrape) and
  ``capvst_items_expanded_total``.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Stages of an item in a worker: reading bytes from storage, decoding and resizing images,
#: the network and the transform, encoding the output, writing it.
STAGES = ("fetch", "decode", "model", "encode", "upload")
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 900.0)
#: States a job passes through (``capvst_jobs`` always has these, zero or not).
JOB_STATES = ("queued", "running", "finalizing", "done", "cancelled")
_LIVE_GAUGE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(port: int, collectors: Iterable[Any] = ()) -> str:
    """In a Celery parent, before it forks: multiprocess mode in a fresh folder (removed at
    exit) and ``/metrics`` on ``port`` (all interfaces). ``collectors`` add metrics computed
    in the parent at scrape time. Returns the folder."""
    folder = tempfile.mkdtemp(prefix="capvst-metrics-")
    # a folder inherited from elsewhere could hold another process tree's samples
    os.environ[ENV] = folder
    os.environ.pop(ENV.lower(), None)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # a forked pool process inherits this hook: not its folder
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    # prometheus_client picks its value class when imported; it may have been imported
    # before the folder was set (Celery's or Flower's imports)
    values.ValueClass = values.get_value_class()

    class _Merged(MultiProcessCollector):  # type: ignore[misc]
        """The pool processes' samples, after dropping the gauges of dead ones (a process
        killed with SIGKILL never says goodbye)."""

        def collect(self) -> Any:
            for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
                m = _LIVE_GAUGE.match(os.path.basename(path))
                if m and not _pid_alive(int(m.group(1))):
                    mark_process_dead(int(m.group(1)), folder)
            return super().collect()

    registry = CollectorRegistry()
    _Merged(registry, path=folder)
    for c in collectors:
        registry.register(c)
    start_http_server(port, registry=registry)
    log.debug("Prometheus metrics on :%d/metrics (pool processes' samples in %s)", port, folder)
    return folder


def process_exited() -> None:
    """In a pool process that is about to exit: its gauges stop counting."""
    folder = os.environ.get(ENV)
    if folder:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(os.getpid(), folder)


class WorkerMetrics:
    """A stylize pool process's metrics; every method is a no-op when metrics are off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        reg = CollectorRegistry()  # samples go to the shared folder; the parent serves them
        self._items = Counter("capvst_items", "Items finished by this worker, by mode, "
                              "status and error code (empty unless failed).",
                              ["mode", "status", "code"], registry=reg)
        self._stages = Histogram("capvst_stage_seconds", "Seconds an item spent in each "
                                 "stage: fetch (storage reads), decode (decode and resize), "
                                 "model (network and transform), encode, upload.",
                                 ["stage"], buckets=STAGE_BUCKETS, registry=reg)
        self._load = Gauge("capvst_model_load_seconds", "Seconds the pool process took to "
                           "load its models and move them to the device.",
                           multiprocess_mode="livemax", registry=reg)
        self._hits = Counter("capvst_style_cache_hits", "Style statistics found in the "
                             "cache.", registry=reg)
        self._misses = Counter("capvst_style_cache_misses", "Style statistics computed "
                               "(not in the cache).", registry=reg)
        self._memory = Gauge("capvst_device_memory_bytes", "Memory the worker's models hold "
                             "on their device: CUDA memory reserved by PyTorch, or the "
                             "resident memory of a CPU worker.",
                             multiprocess_mode="livesum", registry=reg)

    def item(self, mode: str | None, status: str, code: str | None) -> None:
        """One item finished (counted once its result is recorded)."""
        if self.enabled:
            self._items.labels(mode or "", status, code if status == "failed" and code
                               else "").inc()

    def stages(self, seconds: Mapping[str, float]) -> None:
        """The stage times of one item (stages it did not reach are absent)."""
        if self.enabled:
            for stage in STAGES:
                if stage in seconds:
                    self._stages.labels(stage).observe(max(0.0, seconds[stage]))

    def model_load(self, seconds: float) -> None:
        """How long loading the models took."""
        if self.enabled:
            self._load.set(seconds)

    def style_cache(self, hits: int, misses: int) -> None:
        """New cache hits and misses since the last call."""
        if self.enabled:
            if hits:
                self._hits.inc(hits)
            if misses:
                self._misses.inc(misses)

    def device_memory(self, nbytes: int) -> None:
        """The device memory held now."""
        if self.enabled:
            self._memory.set(nbytes)


class SchedulerMetrics:
    """A scheduler pool process's metrics; no-ops when metrics are off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from prometheus_client import CollectorRegistry, Counter

            self._expanded = Counter("capvst_items_expanded", "Manifest items committed by "
                                     "expansion steps (valid or not).",
                                     registry=CollectorRegistry())

    def expanded(self, n: int) -> None:
        """A slice of ``n`` items was committed."""
        if self.enabled and n:
            self._expanded.inc(n)


class JobsCollector:
    """``capvst_jobs{state}``, counted in Redis at each scrape (every job within its TTL).
    ``count`` opens its own short-lived connection and closes it before returning."""

    def __init__(self, count: Callable[[], Mapping[str, int]]) -> None:
        self.count = count

    def describe(self) -> list[Any]:
        return []  # computed per scrape; nothing to register up front

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        try:
            counts = dict(self.count())
        except Exception as exc:  # Redis away: leave the series out rather than lie
            log.warning("capvst_jobs: cannot count jobs in Redis: %s", exc)
            return
        family = GaugeMetricFamily("capvst_jobs", "Jobs in Redis by state.", labels=["state"])
        for state in sorted(set(JOB_STATES) | set(counts)):
            family.add_metric([state], counts.get(state, 0))
        yield family


__all__ = ["ENV", "JOB_STATES", "STAGES", "JobsCollector", "SchedulerMetrics", "WorkerMetrics",
           "process_exited", "serve"]
