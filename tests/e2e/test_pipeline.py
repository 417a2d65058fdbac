"""The whole pipeline on real processes: moto S3 over HTTP, redis-server, the scheduler and
two stylize workers, driven through ``capvst-submit`` exactly as a user would."""

from __future__ import annotations

import json

import pytest

from capvst.cli import _parser, _run
from tests.data import image_bytes, mask_bytes
from tests.services import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, moto_server):
    c = Cluster(tmp_path_factory.mktemp("e2e"), moto_server.url, chunk_size="2")
    try:
        c.scheduler().wait_ready()
        workers = [c.worker("w1"), c.worker("w2")]
        for w in workers:
            w.wait_ready()
        yield c
    finally:
        c.stop()


def _put(s3, bucket, key, data):
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def _inputs(s3, bucket):
    for i in range(4):
        _put(s3, bucket, f"in/content/c{i}.jpg", image_bytes((64, 48), seed=i, fmt="JPEG"))
    for i in range(3):
        _put(s3, bucket, f"in/style/s{i}.png", image_bytes((56, 56), seed=10 + i))
    _put(s3, bucket, "in/masks/c0.png", mask_bytes((64, 48)))
    _put(s3, bucket, "in/masks/s0.png", mask_bytes((56, 56), 0.3))
    _put(s3, bucket, "in/style/broken.png", b"this is not a png at all")


GOOD = [
    {"content": "content/c0.jpg", "style": "style/s0.png"},
    {"content": "content/c1.jpg", "style": "style/s0.png"},                       # shared style
    {"content": "content/c2.jpg", "style": "style/s0.png", "mode": "artistic"},
    {"content": "content/c3.jpg", "style": "style/s1.png", "mode": "artistic"},
    {"content": "content/c1.jpg", "style": "style/s2.png", "format": "jpg"},
    {"content": "content/c2.jpg", "style": ["style/s1.png", "style/s2.png"],
     "style_weights": [0.3, 0.7], "alpha_c": 0.2, "id": "mix"},
    {"content": "content/c0.jpg", "style": "style/s0.png", "content_mask": "masks/c0.png",
     "style_mask": "masks/s0.png", "output": "masked/c0.png"},
    {"content": "content/c3.jpg", "style": "style/s2.png", "max_size": 32},
]
BAD = [
    ({"content": "content/missing.jpg", "style": "style/s0.png"}, "not_found"),
    ({"content": "content/c0.jpg", "style": "style/broken.png"}, "bad_image"),
]


def _manifest(lines):
    return "\n".join(json.dumps(x) for x in lines) + "\n"


def _report(s3, bucket, prefix, job):
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/_capvst/{job}/report.jsonl")["Body"]
    return [json.loads(x) for x in body.read().decode().splitlines()]


def _stylize_locally(pipeline, item, tmp_path, n, monkeypatch):
    """The same item through ``capvst stylize`` in this process (same S3, same settings)."""
    for k, v in pipeline.env.items():
        if k.startswith(("CAPVST_", "AWS_")):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("CAPVST_LOCAL_ROOT")
    out = tmp_path / f"local{n}.{item.get('format', 'png')}"
    argv = ["stylize", item["content"], "--mode", item.get("mode", "photorealistic"),
            "--max-size", str(item.get("max_size", 64)), "-o", str(out)]
    styles = item["style"] if isinstance(item["style"], list) else [item["style"]]
    for s in styles:
        argv += ["--style", s]
    if "style_weights" in item:
        argv += ["--style-weights", ",".join(map(str, item["style_weights"]))]
    if "alpha_c" in item:
        argv += ["--alpha-c", str(item["alpha_c"])]
    if "content_mask" in item:
        argv += ["--content-mask", item["content_mask"], "--style-mask", item["style_mask"]]
    assert _run(argv, _parser) == 0
    return out.read_bytes()


def test_end_to_end(pipeline, s3, bucket, tmp_path, monkeypatch):
    _inputs(s3, bucket)
    lines = GOOD[:4] + [BAD[0][0]] + GOOD[4:] + [BAD[1][0]]
    _put(s3, bucket, "in/manifest.jsonl", _manifest(lines).encode())
    prefix = "out/run1"
    proc = pipeline.submit(f"s3://{bucket}/in/manifest.jsonl", "--output",
                           f"s3://{bucket}/{prefix}", "--max-size", "64", "--wait")
    assert proc.returncode == 3, proc.stderr
    job = proc.stdout.strip().splitlines()[0]
    # not a terminal: progress comes as plain lines, then the summary
    assert f"{job} done: 10/10 done (2 failed, 0 skipped," in proc.stderr
    assert "ETA" not in proc.stderr.split(f"{job} done:")[1]
    assert "/0" not in proc.stderr and "ETA -" not in proc.stderr  # no nonsense line
    assert "failed by code: bad_image 1, not_found 1" in proc.stderr
    assert "8 succeeded, 0 skipped, 2 failed of 10 items" in proc.stderr
    report = _report(s3, bucket, prefix, job)
    assert [r["line"] for r in report] == list(range(1, len(lines) + 1))
    by_line = {r["line"]: r for r in report}
    assert by_line[5]["status"] == "failed" and by_line[5]["error"]["code"] == "not_found"
    assert by_line[10]["status"] == "failed" and by_line[10]["error"]["code"] == "bad_image"
    good_lines = [n for n in range(1, 11) if n not in (5, 10)]
    assert all(by_line[n]["status"] == "succeeded" for n in good_lines), report
    ids = pipeline.model_ids  # workers run the reference weights from checkpoint files
    assert all(by_line[n]["model"] == ids[lines[n - 1].get("mode", "photorealistic")]
               and by_line[n]["attempts"] == 1 for n in good_lines), report
    assert by_line[7]["id"] == "mix" and by_line[7]["style"] == [
        f"s3://{bucket}/in/style/s1.png", f"s3://{bucket}/in/style/s2.png"]
    assert by_line[8]["output"] == f"s3://{bucket}/{prefix}/masked/c0.png"
    assert by_line[1]["output"] == f"s3://{bucket}/{prefix}/c0__s0.png"
    assert by_line[6]["output"].endswith("/c1__s2.jpg")
    # two workers shared the queue and each did part of the job
    workers = {by_line[n]["worker"] for n in good_lines}
    assert len(workers) == 2, workers
    # every good output is byte-identical to capvst stylize on the same inputs
    for n in good_lines:
        item = dict(lines[n - 1])
        for key in ("content", "content_mask", "style_mask"):
            if key in item:
                item[key] = f"s3://{bucket}/in/{item[key]}"
        item["style"] = ([f"s3://{bucket}/in/{s}" for s in item["style"]]
                         if isinstance(item["style"], list) else f"s3://{bucket}/in/{item['style']}")
        key = by_line[n]["output"].split(f"s3://{bucket}/", 1)[1]
        remote = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert remote == _stylize_locally(pipeline, item, tmp_path, n, monkeypatch), n
    summary = json.loads(s3.get_object(
        Bucket=bucket, Key=f"{prefix}/_capvst/{job}/summary.json")["Body"].read())
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (8, 2, 0)
    assert summary["errors"] == {"bad_image": 1, "not_found": 1}
    page = s3.get_object(Bucket=bucket, Key=f"{prefix}/_capvst/{job}/index.html")["Body"].read()
    html = page.decode()
    assert html.count('<tr class="item ') == 10
    assert "Showing 10 of 10 rows" in html
    # failures first
    assert html.index('class="item failed"') < html.index('class="item succeeded"')
    assert "data:image/jpeg;base64," in html


def test_resubmit_to_finished_prefix_skips_everything(pipeline, s3, bucket):
    _inputs(s3, bucket)
    _put(s3, bucket, "in/good.jsonl", _manifest(GOOD[:5]).encode())
    args = [f"s3://{bucket}/in/good.jsonl", "--output", f"s3://{bucket}/out", "--max-size", "64",
            "--wait", "--json"]
    first = pipeline.submit(*args)
    assert first.returncode == 0, first.stderr
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    before = {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing
              if "/_capvst/" not in o["Key"]}
    assert len(before) == 5
    second = pipeline.submit(*args)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert (result["succeeded"], result["skipped"], result["failed"]) == (0, 5, 0)
    report = _report(s3, bucket, "out", result["job"])
    assert {r["status"] for r in report} == {"skipped"}
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    after = {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing
             if "/_capvst/" not in o["Key"]}
    assert after == before  # nothing rewritten


def test_manifest_without_valid_line_exits_2(pipeline, s3, bucket):
    _put(s3, bucket, "m/bad.jsonl", b'not json\n{"content": 3}\n\n["x"]\n')
    proc = pipeline.submit(f"s3://{bucket}/m/bad.jsonl", "--wait", "--json")
    assert proc.returncode == 2, proc.stderr
    result = json.loads(proc.stdout)
    report = _report(s3, bucket, "m/bad-output", result["job"])
    assert [(r["line"], r["status"], r["error"]["code"]) for r in report] == [
        (1, "failed", "invalid_item"), (2, "failed", "invalid_item"),
        (4, "failed", "invalid_item")]
    missing = pipeline.submit(f"s3://{bucket}/m/nope.jsonl")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_status_report_and_csv(pipeline, s3, bucket):
    _inputs(s3, bucket)
    csv_text = ("content,style,style_weights,mode,id\n"
                "content/c0.jpg,style/s0.png|style/s1.png,1|1,,a\n"
                "content/c1.jpg,style/missing.png,,,b\n"
                "content/c2.jpg,style/s1.png,,artistic,c\n")
    _put(s3, bucket, "in/m.csv", csv_text.encode())
    proc = pipeline.submit(f"s3://{bucket}/in/m.csv", "--output", f"s3://{bucket}/csvout",
                           "--max-size", "48", "--wait")
    assert proc.returncode == 3, proc.stderr
    job = proc.stdout.strip().splitlines()[0]
    st = pipeline.capvst("status", job, "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert (status["state"], status["total"], status["succeeded"], status["failed"]) == (
        "done", 3, 2, 1)
    rep = pipeline.capvst("report", job)
    assert rep.returncode == 0
    assert f"s3://{bucket}/csvout/_capvst/{job}/report.jsonl" in rep.stdout
    assert "line 3: not_found" in rep.stdout
    report = _report(s3, bucket, "csvout", job)
    assert [r["id"] for r in report] == ["a", "b", "c"]  # CSV header is line 1
    assert [r["line"] for r in report] == [2, 3, 4]
