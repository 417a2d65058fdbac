"""Flower, started against the test Redis, sees our worker and our task names."""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request

import pytest

from tests.services import Cluster, Proc, free_port, wait_for

pytestmark = pytest.mark.slow


def _get(url, auth=None):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_flower_lists_worker_and_tasks(tmp_path, moto_server, s3, bucket):
    c = Cluster(tmp_path, moto_server.url)
    try:
        c.scheduler().wait_ready()
        c.worker("flowerw").wait_ready()
        port = free_port()
        flower = Proc("flower", [sys.executable, "-m", "celery", "-A", "worker", "flower",
                                 f"--port={port}", "--address=127.0.0.1",
                                 "--basic-auth=admin:s3cret"], c.env, tmp_path)
        c.procs.append(flower)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(base + "/healthcheck")[0] == 200, 60, "flower")
        with pytest.raises(urllib.error.HTTPError) as denied:
            _get(base + "/api/workers")
        assert denied.value.code == 401  # never exposed without authentication

        def workers():
            body = json.loads(_get(base + "/api/workers?refresh=1", "admin:s3cret")[1])
            return body if any(k.startswith("flowerw@") for k in body) else None

        listed = wait_for(workers, 60, "flower to list the worker", interval=1)
        name = next(k for k in listed if k.startswith("flowerw@"))
        assert "capvst.stylize" in listed[name].get("registered", [])
        # a job's tasks appear with readable names and arguments
        from tests.data import image_bytes

        s3.put_object(Bucket=bucket, Key="a.png", Body=image_bytes())
        s3.put_object(Bucket=bucket, Key="m.jsonl",
                      Body=b'{"content": "a.png", "style": "a.png", "max_size": 32}\n'
                           b'{"content": "gone.png", "style": "a.png", "max_size": 32}\n')
        assert c.submit(f"s3://{bucket}/m.jsonl", "--wait").returncode == 3  # failed items

        def tasks():
            body = json.loads(_get(base + "/api/tasks", "admin:s3cret")[1])
            names = {t.get("name") for t in body.values()}
            return body if {"capvst.expand", "capvst.stylize", "capvst.finalize"} <= names \
                else None

        seen = wait_for(tasks, 30, "flower to see the job's tasks", interval=1)
        stylize = [t for t in seen.values() if t.get("name") == "capvst.stylize"]
        assert "job=" in stylize[0]["kwargs"] and "lines=1..2" in stylize[0]["kwargs"]
        # the chunk's outcome is the first thing of its result: a chunk with a failed item
        # reads ITEM_FAILURES, with the counts and the codes
        result = stylize[0]["result"]
        assert stylize[0]["state"] == "SUCCESS"
        assert result.startswith("{'outcome': 'ITEM_FAILURES'"), result
        assert "'succeeded': 1" in result and "'failed': 1" in result
        assert "'codes': {'not_found': 1}" in result
        # and a search finds the chunks with failed items (docs/DEPLOY.md)
        found = json.loads(_get(base + "/api/tasks?taskname=capvst.stylize&search="
                                "result:ITEM_FAILURES", "admin:s3cret")[1])
        assert [t["uuid"] for t in found.values()] == [stylize[0]["uuid"]]
        status, metrics = _get(base + "/metrics")
        assert status == 200 and "flower_events_total" in metrics
    finally:
        c.stop()
