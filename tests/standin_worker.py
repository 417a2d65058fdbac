"""A stand-in stylize worker that does no model work: it records every item as succeeded.

Run as ``celery -A tests.standin_worker worker -Q capvst.stylize``. It consumes the real
queue and writes real job state, so scheduler behaviour can be measured at scale quickly.
"""

from __future__ import annotations

from typing import Any

from capvst.broker import StylizePayload, TaskNames, create_app
from capvst.jobs import JobStore, connect_settings
from capvst.results import ItemResult
from capvst.settings import Settings

settings = Settings()
app = create_app(settings, include=())  # not worker.tasks: this module's task replaces it
_jobs: list[JobStore] = []


def _store() -> JobStore:
    if not _jobs:
        _jobs.append(JobStore(connect_settings(settings), lease_seconds=settings.lease_seconds))
    return _jobs[0]


@app.task(name=TaskNames.STYLIZE.value, shared=False)
def stylize(job: str, items: list[dict[str, Any]]) -> int:
    payload = StylizePayload.model_validate({"job": job, "items": items})
    results = [ItemResult.of_item(it, "succeeded", attempts=1, worker="standin")
               for it in payload.items]
    _changed, due = _store().record(payload.job, results)
    if due:
        app.send_task(TaskNames.FINALIZE.value, kwargs={"job": payload.job})
    return len(items)
