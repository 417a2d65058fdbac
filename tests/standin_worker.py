"""A stand-in stylize worker that does no model work: it records every item as succeeded.

Run as ``celery -A tests.standin_worker worker -Q capvst.stylize``. It consumes the real
queue and writes real job state, so scheduler behaviour can be measured at scale quickly.
"""

from __future__ import annotations

from typing import Any

from capvst.jobs import JobStore, connect
from capvst.settings import Settings
from worker.config import create_app

settings = Settings()
app = create_app(settings, include=())  # not worker.tasks: this module's task replaces it
_jobs: list[JobStore] = []


def _store() -> JobStore:
    if not _jobs:
        _jobs.append(JobStore(connect(settings.broker_url)))
    return _jobs[0]


@app.task(name="capvst.stylize", shared=False)
def stylize(job: str, items: list[dict[str, Any]]) -> int:
    jobs = _store()
    for it in items:
        _changed, due = jobs.record(job, {
            "line": it["line"], "id": it.get("id"), "content": it["content"],
            "style": it["styles"][0], "output": it["output"], "status": "succeeded",
            "error": None, "attempts": 1, "seconds": 0.0, "worker": "standin", "model": None})
        if due:
            app.send_task("capvst.finalize", kwargs={"job": job})
    return len(items)
