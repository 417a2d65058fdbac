"""index.html as a browser sees it: headless Chromium renders the page and the test reads
its DOM. Skipped when Chromium is missing, unless CAPVST_REQUIRE_CHROMIUM=1 (CI), which
makes a missing browser a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin

import pytest

from capvst.jobs import JobRecord
from capvst.manifest import JobOptions
from capvst.results import ErrorInfo, ItemResult
from capvst.settings import Settings
from capvst.storage import Storage, file_uri
from scheduler.report import job_folder, write_report
from tests.data import image_bytes

pytestmark = pytest.mark.slow
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CAPVST_REQUIRE_CHROMIUM") == "1":
        pytest.fail("CAPVST_REQUIRE_CHROMIUM=1 but no Chromium is installed (Debian: "
                    "apt-get install chromium; scripts/test.sh does it as root)")
    pytest.skip("no Chromium (set CAPVST_REQUIRE_CHROMIUM=1 to make this a failure)")


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.classes):
                    out.append(c)
                out += c.all(tag, cls)
        return out

    def one(self, tag: str | None = None, cls: str | None = None) -> Node:
        found = self.all(tag, cls)
        assert len(found) == 1, (tag, cls, len(found))
        return found[0]


class _Dom(HTMLParser):
    VOID = {"img", "br", "meta", "link", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.root = self.cur = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def render_dom(page: Path, tmp: Path) -> Node:
    """The DOM Chromium builds from ``page``."""
    proc = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]
    dom = _Dom()
    dom.feed(proc.stdout)
    return dom.root


def test_index_html_in_chromium(tmp_path):
    out = tmp_path / "out dir"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, seed in (("c1.jpg", 1), ("c2.jpg", 2), ("sun set.png", 3), ("ink.png", 4)):
        (inputs / name).write_bytes(image_bytes((40, 32), seed=seed))
    out.mkdir()
    (out / "c1__mix ok.png").write_bytes(image_bytes((40, 32), seed=5))
    uri = lambda p: file_uri(str(p))  # noqa: E731
    mix = ItemResult(line=1, content=uri(inputs / "c1.jpg"),
                     style=[uri(inputs / "sun set.png"), uri(inputs / "ink.png")],
                     style_weights=[3.0, 7.0], output=uri(out / "c1__mix ok.png"),
                     status="succeeded", attempts=1, seconds=1.25, worker="w1@h",
                     model="0123456789ab", mode="artistic")
    failed = ItemResult(line=2, content=uri(inputs / "missing.jpg"),
                        style=uri(inputs / "ink.png"), output=uri(out / "missing__ink.png"),
                        status="failed", error=ErrorInfo(code="not_found", message="no such "
                                                         "object"), attempts=1, seconds=0.05,
                        worker="w1@h", model="untrained", mode="photorealistic")
    other = ItemResult(line=3, content=uri(inputs / "c2.jpg"), style=uri(inputs / "ink.png"),
                       output=uri(out / "c2__ink.png"), status="skipped", attempts=1,
                       seconds=0.01, worker="w1@h", model="0123456789ab",
                       mode="photorealistic")
    rec = JobRecord(id="20261127-000000-abcdef", manifest=uri(inputs / "m.jsonl"),
                    base=uri(inputs / "m.jsonl"), output=uri(out), options=JobOptions(),
                    created=1.0)
    storage = Storage(Settings(local_root=tmp_path))
    summary = write_report(storage, rec, {"started": "1.0"}, [mix, failed, other], rows=2)
    assert summary["untrained"] is True and summary["errors"] == {"not_found": 1}
    page = Path(unquote(job_folder(rec)[len("file://"):])) / "index.html"
    assert page.is_file()

    dom = render_dom(page, tmp_path)

    banner = dom.one(cls="banner")
    assert "UNTRAINED" in banner.text() and "1 of 3 items" in banner.text()
    codes = dom.one("table", "codes")
    assert [(c.one("td", "code").text(), c.one("td", "n").text())
            for c in codes.all("tr") if c.all("td")] == [("not_found", "1")]
    shown = [p for p in dom.all("p") if p.attrs.get("id") == "shown"]
    assert [p.text() for p in shown] == ["Showing 2 of 3 rows, failures first."]
    rows = dom.all("tr", "item")
    assert [r.attrs["data-line"] for r in rows] == ["2", "1"]  # failures first
    bad, good = rows
    # the failed item: its code and message, no result image, the untrained model marked
    assert bad.classes >= {"failed"} and "not_found" in bad.one("td", "status").text()
    assert not bad.one("td", "result").all("img")
    assert "untrained" in bad.one("td", "model").classes
    assert bad.one("td", "mode").text() == "photorealistic"
    # the mix: every style with its thumbnail and weight
    styles = good.one("td", "styles").all("div", "style")
    assert [s.one("span", "weight").text() for s in styles] == ["0.30", "0.70"]
    assert [s.one("a", "style").text() for s in styles] == ["../../../in/sun set.png",
                                                            "../../../in/ink.png"]
    assert all(s.one("img").attrs["src"].startswith("data:image/jpeg;base64,")
               for s in styles)
    assert good.one("td", "model").text() == "0123456789ab"
    assert good.one("td", "mode").text() == "artistic"
    assert good.one("td", "seconds").text() == "1.25"
    # the output: a relative link that a browser resolves to the file, shown readable
    link = good.one("a", "output")
    assert link.text() == "../../c1__mix ok.png" and "%" not in link.text()
    assert not link.attrs["href"].startswith("file:")
    target = urljoin(page.as_uri(), link.attrs["href"])
    assert Path(unquote(target[len("file://"):])) == out / "c1__mix ok.png"
    assert good.one("td", "result").one("img").attrs["src"].startswith("data:image/jpeg")
