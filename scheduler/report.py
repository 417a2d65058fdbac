"""The job report: ``report.jsonl`` (one line per manifest item, in line order),
``summary.json`` and ``index.html`` under ``{output}/_capvst/{job}/``."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
import time
from collections import Counter
from typing import Any

from PIL import Image, ImageOps

from capvst import images
from capvst.errors import CapvstError
from capvst.jobs import JobRecord, JobStore
from capvst.storage import Storage, join

REPORT_KEYS = ("line", "id", "content", "style", "output", "status", "error", "attempts",
               "seconds", "worker", "model")
THUMB = 128


def job_folder(rec: JobRecord) -> str:
    """``{output}/_capvst/{job}``."""
    return join(rec.output, "_capvst", rec.id)


def report_uri(rec: JobRecord, name: str = "report.jsonl") -> str:
    """URI of one of the job's report files."""
    return join(job_folder(rec), name)


def normalise(rec: dict[str, Any]) -> dict[str, Any]:
    """A result in the report's key order."""
    return {k: rec.get(k) for k in REPORT_KEYS}


def write_report(storage: Storage, jobs: JobStore, rec: JobRecord, fields: dict[str, str],
                 rows: int = 100) -> dict[str, Any]:
    """Write the three report files; returns the summary."""
    max_line = int(fields.get("max_line") or 0)
    statuses: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    models: Counter[str] = Counter()
    seconds = 0.0
    failed_rows: list[dict[str, Any]] = []
    other_rows: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False,
                                     encoding="utf-8") as fh:
        path = fh.name
        for _line, result in jobs.iter_results(rec.id, max_line):
            if result is None:
                continue
            r = normalise(result)
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            statuses[r["status"]] += 1
            if r["error"]:
                codes[r["error"]["code"]] += 1
            if r["worker"]:
                workers[r["worker"]] += 1
            if r["model"]:
                models[r["model"]] += 1
            seconds += float(r["seconds"] or 0.0)
            bucket = failed_rows if r["status"] == "failed" else other_rows
            if len(bucket) < rows:
                bucket.append(r)
    try:
        storage.upload_file(report_uri(rec), path, "application/x-ndjson")
    finally:
        os.unlink(path)
    created = float(fields.get("created") or rec.created)
    started = float(fields.get("started") or created)
    finished = time.time()
    total = sum(statuses.values())
    processed = statuses["succeeded"]
    summary = {
        "job": rec.id, "manifest": rec.manifest, "output": rec.output,
        "state": "cancelled" if fields.get("cancelled") == "1" else "done",
        "manifest_error": fields.get("manifest_error"),
        "items": total, "valid_items": int(fields.get("valid") or 0),
        "succeeded": statuses["succeeded"], "skipped": statuses["skipped"],
        "failed": statuses["failed"], "errors": dict(sorted(codes.items())),
        "created": created, "started": started, "finished": finished,
        "wall_seconds": round(finished - started, 3),
        "item_seconds_total": round(seconds, 3),
        "throughput_items_per_second": round(processed / max(finished - started, 1e-9), 4),
        "workers": dict(workers), "models": dict(models),
        "report": report_uri(rec), "options": rec.options.model_dump(),
    }
    storage.write(report_uri(rec, "summary.json"),
                  json.dumps(summary, indent=2).encode(), content_type="application/json")
    page = render_index(storage, summary, failed_rows + other_rows[: max(0, rows -
                                                                             len(failed_rows))])
    storage.write(report_uri(rec, "index.html"), page.encode(), content_type="text/html")
    return summary


def _thumb(storage: Storage, uri: str | None, cache: dict[str, str | None]) -> str | None:
    if not uri:
        return None
    if uri in cache:
        return cache[uri]
    data_uri = None
    try:
        opened = Image.open(io.BytesIO(storage.read(uri, max_bytes=50_000_000)))
        if opened.width * opened.height <= images.DEFAULT_MAX_PIXELS:
            opened.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEGs decode at reduced scale
            img = (ImageOps.exif_transpose(opened) or opened).convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            data_uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except (CapvstError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        data_uri = None
    cache[uri] = data_uri
    return data_uri


def render_index(storage: Storage, summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A self-contained page: counts, then content | style | result thumbnails, failures
    first. Thumbnails are embedded so the page works wherever it is opened."""
    cache: dict[str, str | None] = {}
    esc = html.escape

    def cell(uri: str | None) -> str:
        src = _thumb(storage, uri, cache)
        label = esc(uri or "")
        if src is None:
            return f'<td class="na" title="{label}">unavailable</td>'
        return f'<td><img src="{src}" alt="{label}" title="{label}"></td>'

    body = []
    for r in rows:
        style = r["style"][0] if isinstance(r["style"], list) and r["style"] else r["style"]
        err = r["error"] or {}
        note = (f'<b>{esc(err.get("code", ""))}</b> {esc(err.get("message", ""))}' if err
                else esc(r["status"]))
        body.append(
            f'<tr class="{esc(r["status"])}"><td>{r["line"]}</td>'
            f'{cell(r["content"] if isinstance(r["content"], str) else None)}'
            f'{cell(style if isinstance(style, str) else None)}'
            f'{cell(r["output"] if r["status"] != "failed" else None)}<td>{note}</td></tr>')
    s = summary
    shown = len(rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>capvst job {esc(s['job'])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:middle;text-align:center}}
tr.failed{{background:#fde8e8}} tr.skipped{{background:#f3f3f3}} td.na{{color:#999}}
img{{max-width:{THUMB}px;max-height:{THUMB}px}}
</style></head><body>
<h1>capvst job {esc(s['job'])}</h1>
<p>{s['items']} items: {s['succeeded']} succeeded, {s['skipped']} skipped,
{s['failed']} failed &middot; state {esc(s['state'])} &middot;
{s['throughput_items_per_second']} items/s</p>
<p>manifest {esc(s['manifest'])}<br>report <code>{esc(s['report'])}</code></p>
<p>Showing {shown} rows, failures first.</p>
<table><tr><th>line</th><th>content</th><th>style</th><th>result</th><th>status</th></tr>
{''.join(body)}
</table></body></html>
"""
