"""The job report: ``report.jsonl`` (one line per manifest item, in line order),
``summary.json`` and ``index.html`` under ``{output}/_capvst/{job}/``.

Results come from the job's result files in object storage (``results/*.jsonl``, written by
the scheduler as it drains Redis), in no particular order and possibly with several results
for one line (a duplicate delivery, a resumed job). They are merged in bounded memory: spread
over bucket files by line number, then each bucket keeps the best result per line (status
precedence, then the newer) and is written in order.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, unquote

from capvst import UNTRAINED
from capvst.errors import CapvstError
from capvst.jobs import JobRecord
from capvst.results import REPORT_KEYS, ItemResult, job_started, throughput
from capvst.storage import Storage, join

THUMB = 128
#: Lines per merge bucket (each bucket is sorted in memory).
BUCKET_LINES = 50_000
#: Largest image (pixels) decoded for a thumbnail; larger ones are shown as a link only.
THUMB_MAX_PIXELS = 16_000_000


def job_folder(rec: JobRecord) -> str:
    """``{output}/_capvst/{job}``."""
    return join(rec.output, "_capvst", rec.id)


def report_uri(rec: JobRecord, name: str = "report.jsonl") -> str:
    """URI of one of the job's report files."""
    return join(job_folder(rec), name)


def results_folder(rec: JobRecord) -> str:
    """Where the job's result files are."""
    return join(job_folder(rec), "results")


def iter_stored_results(storage: Storage, rec: JobRecord) -> Iterator[ItemResult]:
    """Every result in the job's result files (unordered; unreadable lines skipped)."""
    try:
        uris = sorted(storage.iter_uris(results_folder(rec)))
    except CapvstError:
        return
    for uri in uris:
        if not uri.endswith(".jsonl"):
            continue
        for raw in storage.read(uri).splitlines():
            if raw.strip():
                try:
                    yield ItemResult.from_json(raw)
                except ValueError:
                    continue


def merge_in_line_order(results: Iterable[ItemResult]) -> Iterator[ItemResult]:
    """The best result of each line, in line order, in bounded memory."""
    with tempfile.TemporaryDirectory(prefix="capvst-merge-") as tmp:
        files: dict[int, Any] = {}
        try:
            for r in results:
                b = r.line // BUCKET_LINES
                if b not in files:
                    files[b] = open(os.path.join(tmp, f"{b}.jsonl"), "w",  # noqa: SIM115
                                    encoding="ascii")
                files[b].write(r.to_json() + "\n")
        finally:
            for fh in files.values():
                fh.close()
        for b in sorted(files):
            best: dict[int, tuple[int, float, str]] = {}
            with open(os.path.join(tmp, f"{b}.jsonl"), encoding="ascii") as fh:
                for raw in fh:
                    r = ItemResult.from_json(raw)
                    key = (r.rank, r.finished_at)
                    old = best.get(r.line)
                    if old is None or key > old[:2]:
                        best[r.line] = (key[0], key[1], raw)
            for line in sorted(best):
                yield ItemResult.from_json(best[line][2])


class Tally:
    """Counts gathered while the report streams by."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.statuses: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.workers: Counter[str] = Counter()
        self.models: Counter[str] = Counter()
        self.seconds = 0.0
        self.failed_rows: list[ItemResult] = []
        self.other_rows: list[ItemResult] = []

    def add(self, r: ItemResult) -> None:
        """Count one line's result."""
        self.statuses[r.status] += 1
        if r.code:
            self.codes[r.code] += 1
        if r.worker:
            self.workers[r.worker] += 1
        if r.model:
            self.models[r.model] += 1
        self.seconds += float(r.seconds or 0.0)
        bucket = self.failed_rows if r.status == "failed" else self.other_rows
        if len(bucket) < self.rows:
            bucket.append(r)

    @property
    def total(self) -> int:
        """Lines counted."""
        return sum(self.statuses.values())


def write_report(storage: Storage, rec: JobRecord, fields: dict[str, str],
                 results: Iterable[ItemResult], rows: int = 100) -> dict[str, Any]:
    """Write the three report files from ``results`` (in line order); returns the summary."""
    tally = Tally(rows)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False,
                                     encoding="ascii") as fh:
        path = fh.name
        for r in results:
            # ASCII with escapes: a lone surrogate or any odd character in a URI stays valid
            fh.write(json.dumps(r.report_line(), ensure_ascii=True) + "\n")
            tally.add(r)
    try:
        storage.upload_file(report_uri(rec), path, "application/x-ndjson")
    finally:
        os.unlink(path)
    summary = summarize(rec, fields, tally)
    storage.write(report_uri(rec, "summary.json"),
                  json.dumps(summary, indent=2, ensure_ascii=True).encode(),
                  content_type="application/json")
    shown = tally.failed_rows + tally.other_rows[: max(0, rows - len(tally.failed_rows))]
    page = render_index(storage, summary, shown)
    storage.write(report_uri(rec, "index.html"), page.encode("utf-8", "backslashreplace"),
                  content_type="text/html; charset=utf-8")
    return summary


def summarize(rec: JobRecord, fields: dict[str, str], tally: Tally) -> dict[str, Any]:
    """``summary.json``: counts, error codes, timings and throughput (the rate as ``capvst
    status`` computes it: :func:`capvst.results.throughput` from the same start)."""
    created = float(fields.get("created") or rec.created)
    started = job_started(fields.get("started"), created)
    finished = time.time()
    done = tally.total
    untrained = tally.models.get(UNTRAINED, 0)
    return {
        "job": rec.id, "manifest": rec.manifest, "output": rec.output,
        "state": "cancelled" if fields.get("cancelled") else "done",
        "manifest_error": fields.get("manifest_error"),
        "items": done, "valid_items": int(fields.get("valid") or 0),
        "succeeded": tally.statuses["succeeded"], "skipped": tally.statuses["skipped"],
        "failed": tally.statuses["failed"], "errors": dict(sorted(tally.codes.items())),
        "created": created, "started": started, "finished": finished,
        "wall_seconds": round(finished - started, 3),
        "item_seconds_total": round(tally.seconds, 3),
        "throughput_items_per_second": throughput(done, started, finished),
        "workers": dict(tally.workers), "models": dict(tally.models),
        # the seeded untrained network computed some items: their outputs are not
        # stylizations (a worker started with CAPVST_ALLOW_UNTRAINED=1)
        "untrained": bool(untrained), "untrained_items": untrained,
        "report": report_uri(rec), "options": rec.options.model_dump(),
    }


# --- index.html ------------------------------------------------------------------------------

def _thumb(storage: Storage, uri: str | None, cache: dict[str, str | None]) -> str | None:
    """A small embedded JPEG of ``uri``, or None (missing, not an image, too large, odd)."""
    if not uri:
        return None
    if uri in cache:
        return cache[uri]
    data_uri = None
    try:
        from PIL import Image, ImageOps

        opened = Image.open(io.BytesIO(storage.read(uri, max_bytes=50_000_000)))
        if opened.width * opened.height <= THUMB_MAX_PIXELS:
            opened.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEGs decode at reduced scale
            img = (ImageOps.exif_transpose(opened) or opened).convert("RGB")
            img.thumbnail((THUMB, THUMB), reducing_gap=2.0)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            data_uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # a preview is never worth failing the report for
        data_uri = None
    cache[uri] = data_uri
    return data_uri


def _quote(path: str) -> str:
    """Percent-encode a path; odd characters (lone surrogates from undecodable names) never
    make it fail."""
    try:
        return quote(path, errors="surrogateescape")
    except UnicodeEncodeError:
        return quote(path, errors="surrogatepass")


def link_for(uri: str | None, page: str) -> str | None:
    """A link to ``uri`` from the report page: relative when both are in one place."""
    if not uri:
        return None
    folder = page.rsplit("/", 1)[0]
    if uri.startswith("file://") and page.startswith("file://"):
        return _quote(os.path.relpath(unquote(uri[len("file://"):]),
                                      unquote(folder[len("file://"):])))
    if uri.startswith("s3://") and page.startswith("s3://"):
        ub, _, ukey = uri[5:].partition("/")
        pb, _, pkey = folder[5:].partition("/")
        if ub == pb:
            return _quote(os.path.relpath(ukey, pkey or "."))
    return uri


def readable(href: str) -> str:
    """What a link shows: the target as a person reads it (no percent escapes)."""
    return href if href.startswith("s3://") else unquote(href)


_PAGE_CSS_TEMPLATE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:middle;text-align:center}
td.name,td.msg{text-align:left}
tr.failed{background:#fde8e8} tr.skipped{background:#f3f3f3} .na{color:#999}
img{max-width:{t}px;max-height:{t}px;display:block;margin:auto}
.style{display:inline-block;margin:2px 4px;vertical-align:top}
.caption{font-size:85%;word-break:break-all;max-width:{c}px;margin:auto}
.weight{font-weight:bold}
.banner{background:#b00020;color:#fff;padding:.8em 1em;font-weight:bold;margin:1em 0}
td.model.untrained{background:#b00020;color:#fff;font-weight:bold}
table.codes td{text-align:left}
"""
_PAGE_CSS = _PAGE_CSS_TEMPLATE.replace("{t}", str(THUMB)).replace("{c}", str(THUMB + 32))


def render_index(storage: Storage, summary: dict[str, Any], rows: list[ItemResult]) -> str:
    """A self-contained page: counts and failures per error code at the top, then one row per
    item (failures first) with content, every style and its weight, the result as a link,
    model, mode, seconds and the outcome. Thumbnails are embedded so the page works wherever
    it is opened; links are relative to the page where they can be."""
    cache: dict[str, str | None] = {}
    esc = html.escape
    s = summary
    page = str(s["report"]).rsplit("/", 1)[0] + "/index.html"

    def link(uri: str | None, cls: str) -> str:
        href = link_for(uri, page)
        if not href:
            return ""
        return f'<a class="{cls}" href="{esc(href)}">{esc(readable(href))}</a>'

    def figure(uri: str | None, cls: str, extra: str = "") -> str:
        src = _thumb(storage, uri, cache)
        name = readable(link_for(uri, page) or "") if uri else ""
        img = (f'<img src="{src}" alt="{esc(name)}">' if src is not None
               else '<span class="na">no preview</span>')
        return f'{img}<div class="caption">{link(uri, cls)}{extra}</div>'

    body = []
    for r in rows:
        styles = r.style if isinstance(r.style, list) else [r.style] if r.style else []
        weights = r.weights() if styles else []
        style_cells = "".join(
            '<div class="style">' + figure(u, "style", f' <span class="weight">{w:.2f}</span>')
            + "</div>" for u, w in zip(styles, weights)) or '<span class="na">-</span>'
        if r.status == "failed":
            result = (f'<span class="na">not written</span><div class="caption">'
                      f'<span class="output">{esc(readable(link_for(r.output, page) or ""))}'
                      "</span></div>" if r.output else '<span class="na">-</span>')
        else:
            result = figure(r.output, "output")
        err = r.error
        outcome = (f'<b class="code">{esc(err.code)}</b> {esc(err.message)}' if err
                   else esc(r.status))
        model_cls = "model untrained" if r.untrained else "model"
        body.append(
            f'<tr class="item {esc(r.status)}" data-line="{r.line}"><td>{r.line}</td>'
            f'<td class="content">{figure(r.content, "content") if r.content else "-"}</td>'
            f'<td class="styles">{style_cells}</td><td class="result">{result}</td>'
            f'<td class="{model_cls}">{esc(r.model or "-")}</td>'
            f'<td class="mode">{esc(r.mode or "-")}</td>'
            f'<td class="seconds">{float(r.seconds or 0):.2f}</td>'
            f'<td class="msg status">{outcome}</td></tr>')
    banner = ""
    if s.get("untrained"):
        banner = (f'<div class="banner" id="untrained">UNTRAINED model: '
                  f'{s.get("untrained_items", 0)} of {s["items"]} items were computed by the '
                  "seeded untrained network (a worker without a checkpoint, started with "
                  "CAPVST_ALLOW_UNTRAINED=1). Their outputs are not stylizations.</div>")
    codes = "".join(f'<tr><td class="code">{esc(k)}</td><td class="n">{v}</td></tr>'
                    for k, v in sorted(s.get("errors", {}).items(), key=lambda kv: -kv[1]))
    codes_table = (f'<table class="codes" id="codes"><tr><th>failed with</th><th>items</th>'
                   f"</tr>{codes}</table>" if codes else "")
    models = ", ".join(f"{esc(k)} ({v})" for k, v in (s.get("models") or {}).items()) or "-"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>capvst job {esc(s['job'])}</title>
<style>{_PAGE_CSS}</style></head><body>
<h1>capvst job {esc(s['job'])}</h1>
{banner}
<p id="counts">{s['items']} items: {s['succeeded']} succeeded, {s['skipped']} skipped,
{s['failed']} failed &middot; state {esc(s['state'])} &middot;
{s['throughput_items_per_second']} items/s over {s['wall_seconds']} s</p>
{codes_table}
<p>models (items): {models}<br>manifest {esc(str(s['manifest']))}<br>
report <a href="report.jsonl">report.jsonl</a> &middot;
<a href="summary.json">summary.json</a></p>
<p id="shown">Showing {len(rows)} of {s['items']} rows, failures first.</p>
<table class="items"><tr><th>line</th><th>content</th><th>style (weight)</th><th>result</th>
<th>model</th><th>mode</th><th>seconds</th><th>status</th></tr>
{''.join(body)}
</table></body></html>
"""


__all__ = ["REPORT_KEYS", "Tally", "iter_stored_results", "job_folder", "link_for", "readable",
           "merge_in_line_order", "render_index", "report_uri", "results_folder",
           "summarize", "write_report"]
