"""Shared steps of the reliability tests: inputs, jobs, and final-state checks."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tests.data import image_bytes
from tests.services import Cluster, wait_for


def versioned_bucket(s3, name: str) -> str:
    """A bucket that keeps every version, so a test can prove an output was written once."""
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def put_inputs(s3, bucket: str, n: int, size: int = 192, styles: int = 2) -> None:
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"in/c{i}.jpg",
                      Body=image_bytes((size, size * 3 // 4), seed=i, fmt="JPEG"))
    for i in range(styles):
        s3.put_object(Bucket=bucket, Key=f"in/s{i}.png", Body=image_bytes((96, 96), seed=50 + i))


def put_manifest(s3, bucket: str, lines: list[dict[str, Any]], key: str = "in/m.jsonl") -> str:
    s3.put_object(Bucket=bucket, Key=key,
                  Body=("\n".join(json.dumps(x) for x in lines) + "\n").encode())
    return f"s3://{bucket}/{key}"


def simple_lines(n: int, styles: int = 2, **extra: Any) -> list[dict[str, Any]]:
    return [{"content": f"c{i}.jpg", "style": f"s{i % styles}.png", **extra} for i in range(n)]


def submit(c: Cluster, manifest: str, output: str, *args: str) -> str:
    proc = c.submit(manifest, "--output", output, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[0]


def start_job(c: Cluster, s3, bucket: str, n: int, size: int,
              lines: list[dict[str, Any]] | None = None, worker: bool = True):
    """Inputs and manifest in S3, the scheduler (and worker ``w1``) ready, the job submitted
    with ``--max-size size`` to ``s3://bucket/out``; returns (job id, w1 or None)."""
    put_inputs(s3, bucket, n, size=size)
    manifest = put_manifest(s3, bucket, lines if lines is not None else simple_lines(n))
    c.scheduler().wait_ready()
    w1 = c.worker("w1").wait_ready() if worker else None
    return submit(c, manifest, f"s3://{bucket}/out", "--max-size", str(size)), w1


def status(c: Cluster, job: str) -> dict[str, Any] | None:
    proc = c.capvst("status", job, "--json", timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_done(c: Cluster, job: str, timeout: float = 180) -> dict[str, Any]:
    def done():
        st = status(c, job)
        return st if st and st["state"] in ("done", "cancelled") else None

    return wait_for(done, timeout, f"job {job} to finish", interval=0.5)


def in_flight(c: Cluster, job: str) -> list[int]:
    """Lines of ``job`` that a running task has in flight and that have no result yet."""
    r = c.redis.client()
    lines: set[int] = set()
    for key in r.scan_iter("capvst:lease:*"):
        lease = r.hgetall(key)
        if lease.get("job") == job and lease.get("dead") != "1":
            lines |= {int(x) for x in lease.get("lines", "").split(",") if x}
    return [ln for ln in sorted(lines) if rank(c, job, ln) == 0]


def rank(c: Cluster, job: str, line: int) -> int:
    """A line's recorded state: 0 none, 1 failed, 2 skipped, 3 succeeded."""
    return int(c.redis.client().execute_command(
        "BITFIELD", f"capvst:job:{job}:st", "GET", "u2", f"#{line}")[0])


def done_count(c: Cluster, job: str) -> int:
    """Items of ``job`` with a recorded result."""
    f = c.redis.client().hgetall(f"capvst:job:{job}")
    return sum(int(f.get(k, 0)) for k in ("n_succeeded", "n_failed", "n_skipped"))


def wait_item_started(c: Cluster, job: str, timeout: float = 60) -> int:
    """A line that a worker has started and not finished."""

    def running():
        busy = in_flight(c, job)
        return busy[0] if busy else None

    return wait_for(running, timeout, "a worker to start an item", interval=0.02)


def report(s3, bucket: str, prefix: str, job: str) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/_capvst/{job}/report.jsonl")["Body"]
    return [json.loads(x) for x in body.read().decode().splitlines()]


def output_versions(s3, bucket: str, prefix: str) -> Counter[str]:
    """How many versions each output object has (1 means written exactly once)."""
    counts: Counter[str] = Counter()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket,
                                                                  Prefix=prefix + "/"):
        for v in page.get("Versions", []):
            if "/_capvst/" not in v["Key"]:
                counts[v["Key"]] += 1
    return counts


def assert_exact(s3, bucket: str, prefix: str, job: str, n: int,
                 allowed: tuple[str, ...] = ("succeeded",)) -> list[dict[str, Any]]:
    """The final object-storage state: one report line per item, each output once."""
    rows = report(s3, bucket, prefix, job)
    assert [r["line"] for r in rows] == list(range(1, n + 1)), rows
    assert {r["status"] for r in rows} <= set(allowed), [(r["line"], r["status"], r["error"])
                                                        for r in rows]
    versions = output_versions(s3, bucket, prefix)
    written = {r["output"].split(f"s3://{bucket}/", 1)[1] for r in rows
               if r["status"] in ("succeeded", "skipped")}
    assert set(versions) == written, (sorted(versions), sorted(written))
    assert all(v == 1 for v in versions.values()), versions
    summary = json.loads(s3.get_object(
        Bucket=bucket, Key=f"{prefix}/_capvst/{job}/summary.json")["Body"].read())
    assert summary["items"] == n
    assert summary["succeeded"] + summary["skipped"] + summary["failed"] == n
    return rows

