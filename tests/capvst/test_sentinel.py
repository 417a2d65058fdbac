"""sentinel:// brokers: the job-state client and Celery's transport options, against a real
redis-server behind a real Redis Sentinel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capvst.cli_common import EXIT_UNREACHABLE, service_failure
from capvst.jobs import connect
from capvst.settings import Settings
from tests.services import RedisServer, SentinelServer, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(folder / "master", password="m-pw").start()
    watcher = SentinelServer(folder / "sentinel", master, name="capvst-test",
                             password="s-pw").start()
    yield watcher
    watcher.stop()
    master.stop()


def _url(sentinel: SentinelServer, dead_first: bool = True) -> str:
    urls = [f"sentinel://:m-pw@127.0.0.1:{sentinel.port}/3"]
    if dead_first:
        urls.insert(0, f"sentinel://127.0.0.1:{free_port()}")
    return ";".join(urls)


def test_the_job_store_finds_the_master_through_the_sentinel(sentinel):
    client = connect(_url(sentinel), retry_seconds=2, sentinel_master="capvst-test",
                     sentinel_password="s-pw")
    client.set("capvst:test:key", "via sentinel")
    direct = sentinel.master.client()
    direct.select(3)
    assert direct.get("capvst:test:key") == "via sentinel"  # database 3 of the URL
    assert client.get("capvst:test:key") == "via sentinel"


def test_a_sentinel_url_needs_a_master_name(sentinel):
    with pytest.raises(ValueError, match="CAPVST_SENTINEL_MASTER"):
        connect(_url(sentinel))
    with pytest.raises(ValueError, match="CAPVST_SENTINEL_MASTER"):
        Settings(broker_url=_url(sentinel))


def test_unknown_master_is_one_line_exit_4(sentinel):
    settings = Settings(broker_url=_url(sentinel), sentinel_master="nope",
                        sentinel_password="s-pw")
    client = connect(settings.broker_url, retry_seconds=0, sentinel_master="nope",
                     sentinel_password="s-pw")
    with pytest.raises(Exception) as e:
        client.ping()
    fail = service_failure(e.value, settings)
    assert fail is not None and fail.code == EXIT_UNREACHABLE
    assert "no Redis Sentinel" in str(fail) and "'nope'" in str(fail)
    assert "m-pw" not in str(fail)


def test_celery_gets_the_master_name_and_the_sentinel_password(sentinel):
    from capvst.broker import create_app

    conf = create_app(Settings(broker_url=_url(sentinel), sentinel_master="capvst-test",
                               sentinel_password="s-pw")).conf
    opts = conf.broker_transport_options
    assert opts["master_name"] == "capvst-test"
    assert opts["sentinel_kwargs"]["password"] == "s-pw"
    assert opts["sentinel_kwargs"]["socket_connect_timeout"] == 5
    assert "master_name" not in create_app(Settings()).conf.broker_transport_options


def _capvst(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPVST_")}
    full.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "capvst", *args], capture_output=True,
                          text=True, env=full, cwd=str(REPO), timeout=60)


def test_cli_through_the_sentinel(sentinel):
    ok = _capvst("status", "JOB", CAPVST_BROKER_URL=_url(sentinel),
                 CAPVST_SENTINEL_MASTER="capvst-test", CAPVST_SENTINEL_PASSWORD="s-pw")
    assert ok.returncode == 1 and "job JOB is not in Redis" in ok.stderr, ok.stderr
    bad = _capvst("status", "JOB", CAPVST_BROKER_URL=_url(sentinel),
                  CAPVST_SENTINEL_MASTER="capvst-test", CAPVST_SENTINEL_PASSWORD="wrong")
    assert bad.returncode == EXIT_UNREACHABLE, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "refused the credentials (CAPVST_SENTINEL_PASSWORD)" in bad.stderr


@pytest.mark.slow
def test_the_job_store_follows_a_failover(tmp_path):
    """Kill the master: the sentinel promotes the replica and the same client goes on."""
    import redis

    from tests.services import wait_for

    master = RedisServer(tmp_path / "m", password="pw").start()
    replica = RedisServer(tmp_path / "r", password="pw")
    replica_proc = subprocess.Popen(
        ["redis-server", "--port", str(replica.port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(replica.folder), "--requirepass", "pw", "--masterauth", "pw",
         "--replicaof", "127.0.0.1", str(master.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    watcher = None
    try:
        wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up",
                 15, "the replica to sync")
        watcher = SentinelServer(tmp_path / "s", master, name="ha").start()
        wait_for(lambda: redis.Redis(port=watcher.port).sentinel_master("ha")["num-slaves"]
                 >= 1, 20, "the sentinel to see the replica")
        url = f"sentinel://:pw@127.0.0.1:{watcher.port}/0"
        client = connect(url, retry_seconds=30, sentinel_master="ha")
        client.set("k", "before")
        wait_for(lambda: replica.client().get("k") == "before", 10, "replication")
        master.kill()
        wait_for(lambda: watcher.master_address() == ("127.0.0.1", replica.port), 60,
                 "the failover")
        client.set("k", "after")  # the same client, now on the promoted replica
        assert replica.client().get("k") == "after"
    finally:
        if watcher:
            watcher.stop()
        replica_proc.kill()
        replica_proc.wait(10)
        master.stop()

