"""An in-process job engine for tests: the real scheduler functions, job store (a real
redis-server) and storage (local files), with the broker replaced by a list of the messages
that would have been published, which the test delivers itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capvst.broker import StylizePayload, TaskNames
from capvst.jobs import JobRecord, JobStore, ManifestPin, connect
from capvst.manifest import JobOptions, detect_format
from capvst.results import ItemResult
from capvst.settings import Settings
from capvst.storage import Storage, file_uri, join
from scheduler.report import job_folder
from scheduler.service import Context, expand_slice, finalize_job


@dataclass
class Outbox:
    """Messages the engine published, in order; ``fail`` makes the next publishes raise."""

    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail: Callable[[str, dict[str, Any]], bool] | None = None

    def __call__(self, name: str, kwargs: dict[str, Any], argsrepr: str) -> None:
        if self.fail is not None and self.fail(name, kwargs):
            from kombu.exceptions import OperationalError

            raise OperationalError("publish refused")
        self.sent.append((name, kwargs))

    def take(self, name: str | None = None) -> list[dict[str, Any]]:
        """Remove and return the messages (of one task name)."""
        out = [k for n, k in self.sent if name is None or n == name]
        self.sent = [(n, k) for n, k in self.sent if not (name is None or n == name)]
        return out


def engine(redis_url: str, root: Path, **settings: Any) -> tuple[Context, Outbox]:
    """A scheduler context over a real Redis and the local folder ``root``."""
    s = Settings(broker_url=redis_url, local_root=root, retry_backoff=0.01,
                 retry_backoff_max=0.05, lease_seconds=2, reconcile_interval=0.2,
                 **settings)
    out = Outbox()
    jobs = JobStore(connect(redis_url, retry_seconds=4), 3600, s.lease_seconds)
    return Context(s, Storage(s), jobs, out, lambda: 0), out


def submit(ctx: Context, manifest: Path, output: Path, job: str = "job-1",
           options: JobOptions | None = None) -> JobRecord:
    """What ``capvst-submit`` stores for a local manifest (pinned), without the broker."""
    uri = file_uri(str(manifest))
    pin = ctx.storage.pin(uri)
    assert pin is not None
    rec = JobRecord(id=job, manifest=uri, base=uri, output=file_uri(str(output)),
                    options=options or JobOptions(), format=detect_format(uri),
                    created=1.0, pin=ManifestPin(**pin))
    ctx.storage.write(join(job_folder(rec), "job.json"), rec.model_dump_json().encode())
    ctx.jobs.create(rec)
    return rec


def run_expansion(ctx: Context, out: Outbox, rec: JobRecord, epoch: int = 0,
                  max_steps: int = 10_000) -> list[str]:
    """Expand from the job's cursor until no expand message is left; the outcomes."""
    f = ctx.jobs.fields(rec.id)
    steps = [dict(job=rec.id, epoch=epoch, offset=int(f.get("cursor_offset", 0)),
                  line=int(f.get("cursor_line", 1)))]
    outcomes = []
    for _ in range(max_steps):
        if not steps:
            break
        k = steps.pop(0)
        outcomes.append(expand_slice(ctx, k["job"], k["epoch"], k["offset"], k["line"]))
        steps += out.take(TaskNames.EXPAND.value)
    return outcomes


def work(ctx: Context, out: Outbox, status: str = "succeeded") -> int:
    """A stand-in worker: every queued stylize message's items get ``status``."""
    n = 0
    for k in out.take(TaskNames.STYLIZE.value):
        p = StylizePayload.model_validate(k)
        results = [ItemResult.of_item(i, status, worker="standin")  # type: ignore[arg-type]
                   for i in p.items]
        _changed, due = ctx.jobs.record(p.job, results)
        if due:
            out(TaskNames.FINALIZE.value, {"job": p.job}, "")
        n += len(results)
    return n


def finish(ctx: Context, out: Outbox) -> list[str]:
    """Deliver every queued finalize message."""
    return [finalize_job(ctx, k["job"]) for k in out.take(TaskNames.FINALIZE.value)]


def report_rows(rec: JobRecord) -> list[dict[str, Any]]:
    """The job's report.jsonl."""
    path = Path(rec.output[len("file://"):]) / "_capvst" / rec.id / "report.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]
