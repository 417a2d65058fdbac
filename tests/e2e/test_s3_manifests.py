"""Manifests users already have, through the queue: an S3 Batch Operations CSV and an S3
Inventory report on moto's S3 server, run by the real scheduler and a worker."""

from __future__ import annotations

import json

import pytest

from capvst.storage import versioned
from tests.data import image_bytes
from tests.s3lists import batch_csv, inventory_csv_gz, inventory_manifest
from tests.services import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, moto_server):
    c = Cluster(tmp_path_factory.mktemp("s3lists"), moto_server.url, chunk_size="2",
                worker_modes="photorealistic")
    try:
        c.scheduler().wait_ready()
        c.worker("w1").wait_ready()
        yield c
    finally:
        c.stop()


def _report(s3, bucket, prefix, job):
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/_capvst/{job}/report.jsonl")["Body"]
    return {r["line"]: r for r in map(json.loads, body.read().decode().splitlines())}


def _exists(s3, bucket, key):
    return s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) == 1


def test_s3_batch_operations_csv(cluster, s3, bucket):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="photos/2024/a.jpg", Body=image_bytes((48, 40), 1, "JPEG"))
    s3.put_object(Bucket=bucket, Key="photos/2024/b c.jpg", Body=image_bytes((40, 48), 2))
    v1 = s3.put_object(Bucket=bucket, Key="photos/v/x.jpg",
                       Body=image_bytes((44, 44), 3, "JPEG"))["VersionId"]
    s3.put_object(Bucket=bucket, Key="photos/v/x.jpg", Body=b"the latest is no image")
    s3.put_object(Bucket=bucket, Key="styles/s.png", Body=image_bytes((40, 40), 9))
    rows = batch_csv([(bucket, "photos/2024/a.jpg"), (bucket, "photos/2024/b c.jpg"),
                      (bucket, "photos/v/x.jpg", v1), (bucket, "photos/missing.jpg"),
                      (bucket, "photos/2024/")]).decode().splitlines()
    rows.insert(1, "")  # a blank line keeps the physical numbering
    s3.put_object(Bucket=bucket, Key="lists/batch.csv", Body="\n".join(rows).encode() + b"\n")
    prefix = "out/batch"
    proc = cluster.submit(f"s3://{bucket}/lists/batch.csv", "--style",
                          f"s3://{bucket}/styles/s.png", "--output", f"s3://{bucket}/{prefix}",
                          "--max-size", "64", "--wait")
    assert proc.returncode == 3, proc.stderr  # the missing object and the placeholder fail
    job = proc.stdout.split()[0]
    report = _report(s3, bucket, prefix, job)
    assert sorted(report) == [1, 3, 4, 5, 6]   # the CSV's physical lines
    assert report[1]["content"] == f"s3://{bucket}/photos/2024/a.jpg"
    assert report[3]["content"] == f"s3://{bucket}/photos/2024/b c.jpg"
    assert report[4]["content"] == versioned(f"s3://{bucket}/photos/v/x.jpg", v1)
    for n, key in ((1, "photos/2024/a__s.png"), (3, "photos/2024/b c__s.png"),
                   (4, "photos/v/x__s.png")):
        assert report[n]["status"] == "succeeded", report[n]
        assert report[n]["style"] == f"s3://{bucket}/styles/s.png"
        assert report[n]["output"] == f"s3://{bucket}/{prefix}/{key}"
        assert _exists(s3, bucket, f"{prefix}/{key}")
    assert report[5]["error"]["code"] == "not_found"
    assert report[5]["content"] == f"s3://{bucket}/photos/missing.jpg"
    assert report[6]["error"]["code"] == "invalid_item"
    assert "folder placeholder" in report[6]["error"]["message"]


def test_s3_inventory_report(cluster, s3, bucket):
    s3.put_object(Bucket=bucket, Key="src/2024/a.jpg", Body=image_bytes((48, 40), 4, "JPEG"))
    s3.put_object(Bucket=bucket, Key="src/ü/b c.png", Body=image_bytes((40, 48), 5))
    s3.put_object(Bucket=bucket, Key="styles/s1.png", Body=image_bytes((40, 40), 10))
    s3.put_object(Bucket=bucket, Key="styles/s2.png", Body=image_bytes((40, 40), 11))
    rows = [{"Bucket": bucket, "Key": "src/2024/a.jpg", "Size": "1"},
            {"Bucket": bucket, "Key": "src/2024/", "Size": "0"},
            {"Bucket": bucket, "Key": "src/notes.txt", "Size": "3"},
            {"Bucket": bucket, "Key": "src/ü/b c.png", "Size": "2"},
            {"Bucket": bucket, "Key": "src/old.jpg", "IsDeleteMarker": "true"}]
    data = {"inventory/src/cfg/data/0001.csv.gz": inventory_csv_gz(rows)}
    for key, body in data.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    manifest = "inventory/src/cfg/2024-06-01T00-00Z/manifest.json"
    s3.put_object(Bucket=bucket, Key=manifest, Body=inventory_manifest(bucket, bucket, data))
    prefix = "out/inventory"
    proc = cluster.submit(f"s3://{bucket}/{manifest}", "--manifest-format", "s3-inventory",
                          "--style", f"s3://{bucket}/styles/s1.png", "--style",
                          f"s3://{bucket}/styles/s2.png", "--style-weights", "0.3,0.7",
                          "--output", f"s3://{bucket}/{prefix}", "--max-size", "64", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert "5 objects listed, 2 images to stylize; skipped: 1 delete markers, " \
           "1 folder placeholders, 1 without an image extension" in proc.stderr
    job = proc.stdout.split()[0]
    report = _report(s3, bucket, prefix, job)
    assert [r["content"] for _, r in sorted(report.items())] == [
        f"s3://{bucket}/src/2024/a.jpg", f"s3://{bucket}/src/ü/b c.png"]
    for r, key in zip((report[1], report[2]), ("src/2024/a__s1+s2.png", "src/ü/b c__s1+s2.png")):
        assert r["status"] == "succeeded", r
        assert r["style"] == [f"s3://{bucket}/styles/s1.png", f"s3://{bucket}/styles/s2.png"]
        assert r["output"] == f"s3://{bucket}/{prefix}/{key}"
        assert _exists(s3, bucket, f"{prefix}/{key}")
    # the listing the job ran from sits next to its report
    listed = s3.get_object(Bucket=bucket, Key=f"{prefix}/_capvst/{job}/manifest.jsonl")
    assert len(listed["Body"].read().decode().splitlines()) == 2


def test_s3_lists_need_a_style(cluster, s3, bucket):
    s3.put_object(Bucket=bucket, Key="lists/b.csv", Body=b"photos,a.jpg\n")
    proc = cluster.submit(f"s3://{bucket}/lists/b.csv")
    assert proc.returncode == 2, proc.stderr
    assert "S3 Batch Operations manifest" in proc.stderr and "--style" in proc.stderr
