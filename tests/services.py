"""Real services for tests: redis-server, moto's S3 server, and capvst processes.

Nothing here fakes Redis or S3: each helper starts the real program on a free port so tests
can also kill and restart it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``pred`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # keep polling through startup errors
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


class RedisServer:
    """A private redis-server on a free port; ``persist`` turns on the append-only file."""

    def __init__(self, folder: Path, persist: bool = False, password: str | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--appendfsync", "always", "--logfile", str(self.folder / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self.ping, 15, f"redis-server on port {self.port}")
        return self

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def kill(self) -> None:
        """SIGKILL: whatever is not persisted is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill and start again on the same port."""
        self.kill()
        wait_for(lambda: _port_free(self.port), 10, "the Redis port to be free")
        self.start()

    def stop(self) -> None:
        self.kill()


class SentinelServer:
    """A Redis Sentinel (``redis-server --sentinel``) watching ``master`` as ``name``."""

    def __init__(self, folder: Path, master: RedisServer, name: str = "capvst-master",
                 password: str | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.master = master
        self.name = name
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        conf = self.folder / "sentinel.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.folder}",
                 f"logfile {self.folder / 'sentinel.log'}",
                 f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1",
                 f"sentinel down-after-milliseconds {self.name} 2000",
                 f"sentinel failover-timeout {self.name} 10000"]
        if self.master.password:
            lines.append(f"sentinel auth-pass {self.name} {self.master.password}")
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf.write_text("\n".join(lines) + "\n")  # the sentinel rewrites it as it runs
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self.master_address, 15, f"redis sentinel on port {self.port}")
        return self

    def master_address(self) -> tuple[str, int] | None:
        import redis

        client = redis.Redis(port=self.port, password=self.password, decode_responses=True)
        try:
            addr = client.execute_command("SENTINEL", "get-master-addr-by-name", self.name)
        finally:
            client.close()
        return (addr[0], int(addr[1])) if addr else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class MotoServer:
    """moto's standalone S3-compatible server, over HTTP."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log = open(folder / "moto.log", "wb")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-p",
             str(self.port), "-H", "127.0.0.1"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: urllib.request.urlopen(self.url + "/moto-api/", timeout=2),
                 30, "moto server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class Proc:
    """A capvst service process with its log in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.log_path = folder / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> Proc:
        wait_for(lambda: " ready." in self.log() or self.proc.poll() is not None, timeout,
                 f"{self.name} to be ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{self.log()[-3000:]}")
        return self

    def children(self) -> list[int]:
        """Pids of the pool processes (prefork children)."""
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL to the whole process group: a lost node."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(20)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


class Cluster:
    """Redis, the scheduler and workers sharing one environment; S3 from ``s3_url``.

    Workers run as production runs them: with checkpoint files (the reference weights in the
    authors' format) and PyTorch's default thread settings. ``untrained=True`` leaves the
    checkpoints unset instead.
    """

    def __init__(self, folder: Path, s3_url: str | None, persist: bool = False,
                 untrained: bool = False, sentinel: bool = False, **settings: str) -> None:
        self.folder = folder
        self.redis = RedisServer(folder / "redis", persist=persist,
                                 password="master-pw" if sentinel else None).start()
        self.sentinel: SentinelServer | None = None
        self.procs: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CAPVST_")}
        self.env.update(AWS_ENV)
        self.env.update({
            "CAPVST_BROKER_URL": self.redis.url,
            "CAPVST_LOCAL_ROOT": str(folder),
            "CAPVST_RETRY_BACKOFF": "0.05",
            "CAPVST_RETRY_BACKOFF_MAX": "0.5",
            "CAPVST_DEVICE": "cpu",
            # short leases and a busy reconciler so that repairs happen within seconds
            "CAPVST_LEASE_SECONDS": "5",
            "CAPVST_RECONCILE_INTERVAL": "1",
            "PYTHONUNBUFFERED": "1",
        })
        self.model_ids: dict[str, str] = {}
        if not untrained:
            from tests.refdata import write_weights

            files = write_weights(folder / "weights")
            for mode, name in (("photorealistic", "photorealistic-seed0"),
                               ("artistic", "artistic-seed1")):
                self.env[f"CAPVST_CHECKPOINT_{mode.upper()}"] = str(files[name])
                digest = hashlib.sha256(files[name].read_bytes()).hexdigest()
                self.model_ids[mode] = digest[:12]
        if s3_url:
            self.env["CAPVST_S3_ENDPOINT_URL"] = s3_url
        if sentinel:
            # broker and job state through a sentinel; a dead sentinel listed first must not
            # matter, and the master's password goes in every URL (Celery may switch URLs)
            self.sentinel = SentinelServer(folder / "sentinel", self.redis,
                                           password="sentinel-pw").start()
            auth = f":{self.redis.password}@"
            self.env.update({
                "CAPVST_BROKER_URL": f"sentinel://{auth}127.0.0.1:{free_port()}/0;"
                                     f"sentinel://{auth}127.0.0.1:{self.sentinel.port}/0",
                "CAPVST_SENTINEL_MASTER": self.sentinel.name,
                "CAPVST_SENTINEL_PASSWORD": "sentinel-pw",
            })
        self.env.update({f"CAPVST_{k.upper()}": str(v) for k, v in settings.items()})

    def settings(self):  # type: ignore[no-untyped-def]
        from capvst.settings import Settings

        keys = {k[len("CAPVST_"):].lower(): v for k, v in self.env.items()
                if k.startswith("CAPVST_")}
        return Settings(**keys)

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str] | None) -> Proc:
        env = dict(self.env)
        env.update(extra_env or {})
        p = Proc(name, argv, env, self.folder)
        self.procs.append(p)
        return p

    def scheduler(self, name: str = "scheduler", extra_env: dict[str, str] | None = None
                  ) -> Proc:
        return self._start(name, [sys.executable, "-m", "capvst", "scheduler", "-n",
                                  f"{name}@%h", "--loglevel", "INFO"], extra_env)

    def worker(self, name: str = "w1", extra_env: dict[str, str] | None = None,
               extra_args: list[str] | None = None) -> Proc:
        return self._start(name, [sys.executable, "-m", "capvst", "worker", "-n",
                                  f"{name}@%h", "--loglevel", "INFO", *(extra_args or [])],
                           extra_env)

    def capvst(self, *args: str, timeout: float = 300, input: str | None = None
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "capvst", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
                              input=input)

    def submit(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c",
                               "from capvst.cli import submit_main; submit_main()", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=str(REPO))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.sentinel:
            self.sentinel.stop()
        self.redis.stop()


@contextlib.contextmanager
def cluster(folder: Path, s3_url: str | None, **kw: str) -> Iterator[Cluster]:
    c = Cluster(folder, s3_url, **kw)
    try:
        yield c
    finally:
        c.stop()
