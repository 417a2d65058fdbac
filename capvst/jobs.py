"""Job state in Redis: small, idempotent, and gone when the job is done.

While a job runs, Redis holds what is running, not what is done:

| key | type | holds |
|---|---|---|
| ``capvst:job:{id}`` | hash | the record, state, epoch, cursor, counts, leases, summary |
| ``…:st`` | string | two bits per manifest line: none, failed, skipped, succeeded |
| ``…:cx`` | string | one bit per line whose failure is ``cancelled`` (resume undoes those) |
| ``…:inbox`` | list | results not yet copied to object storage (drained every few seconds) |
| ``…:claims`` | hash | 8-byte digest of an output URI → the line that owns it |
| ``…:slices`` | hash | slice offset → items, valid items (re-running a slice overwrites) |
| ``…:deaths`` | hash | line → times its worker died while it was in flight (rare) |
| ``…:late`` | list | results that arrived after the report was written |
| ``capvst:lease:{task}`` | hash | a task run's lease: job, items, lines in flight, token |
| ``capvst:alive:{task}:{token}`` | string | present while that run lives (renewed) |
| ``capvst:active`` / ``capvst:jobs`` | set / sorted set | jobs not yet finalized / every job |

Full result records live in object storage (``_capvst/{job}/results/*.jsonl``); a finished
job keeps only its hash (record and summary) until the TTL. Lua scripts in ``capvst/lua``
make recording atomic and idempotent: a line's best result counts once; a worse or equal one
changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from pydantic import BaseModel, ConfigDict
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .manifest import JobOptions, ManifestFormat
from .results import RANK, ItemResult

if TYPE_CHECKING:
    from .settings import Settings

PREFIX = "capvst:job:"
JOBS_INDEX = "capvst:jobs"
ACTIVE = "capvst:active"
LEASE_PREFIX = "capvst:lease:"
ALIVE_PREFIX = "capvst:alive:"
LEASES = "capvst:leases"
LEADER = "capvst:reconciler"
PARTS = ("st", "cx", "inbox", "deaths", "slices", "claims", "late")


def _script(name: str) -> str:
    folder = resources.files("capvst") / "lua"
    common = (folder / "common.lua").read_text()
    body = (folder / f"{name}.lua").read_text()
    return body if name in ("lease",) else common + "\n" + body


class ManifestPin(BaseModel):
    """What identifies the manifest's content at submit: reads must see the same bytes."""

    model_config = ConfigDict(extra="ignore")
    size: int
    etag: str | None = None
    version_id: str | None = None
    mtime_ns: int | None = None


class JobRecord(BaseModel):
    """What a job is: kept in Redis and in ``{output}/_capvst/{id}/job.json``."""

    model_config = ConfigDict(extra="ignore")
    id: str
    manifest: str
    base: str
    output: str
    options: JobOptions
    format: ManifestFormat | None = None
    created: float
    pin: ManifestPin | None = None


@dataclass
class Counts:
    """Progress of a job."""

    state: str
    total: int | None
    expanded_items: int
    succeeded: int
    failed: int
    skipped: int
    valid: int | None
    cancelled: bool
    created: float
    started: float | None
    finished: float | None

    @property
    def done(self) -> int:
        """Items with a final status."""
        return self.succeeded + self.failed + self.skipped


@dataclass(frozen=True)
class Lease:
    """A task run's lease: which job and lines it has in flight."""

    task_id: str
    token: str
    job: str
    lines: tuple[int, ...]
    isolated: bool
    deadline: float | None = None
    dead: bool = False


def connect(url: str, *, retry_seconds: float = 60.0, sentinel_master: str | None = None,
            sentinel_password: str | None = None) -> redis.Redis:
    """A client that rides out Redis restarts: connection errors retried with backoff.

    ``url`` is a ``redis://``/``rediss://`` URL, or Celery's ``sentinel://h1:26379;
    sentinel://h2:26379`` list, which needs ``sentinel_master``; the client then asks the
    sentinels for the current master and follows a failover.
    """
    attempts = max(1, int(retry_seconds // 2))
    options: dict[str, Any] = dict(
        decode_responses=True, socket_timeout=30, socket_connect_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=4.0, base=0.1), attempts),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    if not url.strip().lower().startswith("sentinel://"):
        return redis.Redis.from_url(url, **options)
    if not sentinel_master:
        raise ValueError("a sentinel:// URL needs the master's name (CAPVST_SENTINEL_MASTER)")
    hosts, master_auth = _sentinel_hosts(url)
    sentinels = Sentinel(hosts, sentinel_kwargs=sentinel_client_options(sentinel_password))
    return sentinels.master_for(sentinel_master, redis_class=redis.Redis, **master_auth,
                                **options)


def sentinel_client_options(password: str | None = None) -> dict[str, Any]:
    """Options of the connections to the sentinels themselves (Celery's ``sentinel_kwargs``
    too): each sentinel is asked once, with timeouts, and the next one tried at once. A down
    sentinel would otherwise cost every new connection redis-py's default retries (seconds)
    and an unreachable host could block it."""
    out: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5,
                           "retry": Retry(NoBackoff(), 0)}
    if password:
        out["password"] = password
    return out


def _sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Sentinel addresses of ``sentinel://…;sentinel://…`` and the master's username,
    password and database, from the first URL that has them (Celery reads them from the URL
    it is connected through, so every URL should carry the same)."""
    hosts: list[tuple[str, int]] = []
    auth: dict[str, Any] = {}
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        u = urlsplit(part)
        if u.scheme.lower() != "sentinel" or not u.hostname:
            raise ValueError(f"not a sentinel:// URL: {part.split('@')[-1]!r}")
        hosts.append((u.hostname, u.port or 26379))
        db = u.path.strip("/")
        for key, value in (("username", u.username), ("password", u.password), ("db", db)):
            if value and key not in auth:
                auth[key] = int(value) if key == "db" else unquote(value)
    return hosts, auth


def connect_settings(settings: Settings, *, retry_seconds: float = 60.0) -> redis.Redis:
    """:func:`connect` to the deployment's broker (also through Redis Sentinel)."""
    return connect(settings.broker_url, retry_seconds=retry_seconds,
                   sentinel_master=settings.sentinel_master,
                   sentinel_password=settings.sentinel_password)


def redis_url_has_password(url: str) -> bool:
    """Whether a Redis URL carries a password (``redis://:secret@host``)."""
    from urllib.parse import urlsplit

    try:
        return bool(urlsplit(url.split(";")[0]).password)
    except ValueError:
        return False


def output_digest(uri: str) -> str:
    """A short key for an output URI in the claims hash (8 bytes, base64)."""
    return base64.b64encode(hashlib.blake2b(uri.encode("utf-8", "surrogatepass"),
                                            digest_size=8).digest()).decode()


def _result_args(results: Iterable[ItemResult], records: bool = True) -> list[Any]:
    """Script arguments per result; without ``records`` the JSON is left out (state only)."""
    args: list[Any] = []
    for r in results:
        cancelled = int(r.status == "failed" and r.code == "cancelled")
        args += [r.line, RANK[r.status], cancelled, r.to_json() if records else ""]
    return args


class JobStore:
    """Typed access to the Redis keys of jobs."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 14 * 86400,
                 lease_seconds: float = 60.0) -> None:
        self.r = client
        self.ttl = ttl_seconds
        self.lease_seconds = lease_seconds
        self._record = client.register_script(_script("record"))
        self._advance = client.register_script(_script("advance"))
        self._uncancel = client.register_script(_script("uncancel"))
        self._finish = client.register_script(_script("finish"))
        self._lease = client.register_script(_script("lease"))

    # -- keys ----------------------------------------------------------------------------------
    @staticmethod
    def key(job: str, part: str = "") -> str:
        """Redis key of a job's hash or one of its per-line parts."""
        return f"{PREFIX}{job}" + (f":{part}" if part else "")

    def _keys(self, job: str, *parts: str) -> list[str]:
        return [self.key(job)] + [self.key(job, p) for p in parts]

    # -- the job -------------------------------------------------------------------------------
    def create(self, rec: JobRecord, state: str = "queued") -> None:
        """Store a new job (or re-create one whose keys were lost)."""
        fields = {"record": rec.model_dump_json(), "state": state, "created": rec.created,
                  "epoch": 0, "cursor_offset": 0, "cursor_line": 1, "n_succeeded": 0,
                  "n_failed": 0, "n_skipped": 0,
                  "expand_at": time.time() + self.lease_seconds}
        pipe = self.r.pipeline()
        pipe.hset(self.key(rec.id), mapping=fields)  # type: ignore[arg-type]
        pipe.zadd(JOBS_INDEX, {rec.id: rec.created})
        pipe.sadd(ACTIVE, rec.id)
        pipe.execute()

    def exists(self, job: str) -> bool:
        """Whether Redis knows the job."""
        return bool(self.r.exists(self.key(job)))

    def record_of(self, job: str) -> JobRecord | None:
        """The job's definition, or None."""
        raw = self.r.hget(self.key(job), "record")
        return JobRecord.model_validate_json(raw) if raw else None  # type: ignore[arg-type]

    def fields(self, job: str) -> dict[str, str]:
        """Every field of the job hash."""
        return self.r.hgetall(self.key(job))  # type: ignore[return-value]

    def set(self, job: str, **fields: Any) -> None:
        """Set job fields (only on a job that exists)."""
        mapping = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                   for k, v in fields.items()}
        if self.exists(job):  # never re-create the keys of an unknown or expired job
            self.r.hset(self.key(job), mapping=mapping)  # type: ignore[arg-type]

    def set_if_absent(self, job: str, field: str, value: Any) -> bool:
        """Set a field once; True if this call set it."""
        return bool(self.r.hsetnx(self.key(job), field, value))

    def cancel_token(self, job: str) -> str | None:
        """The current cancellation's token, or None when the job is not cancelled."""
        return self.r.hget(self.key(job), "cancelled")  # type: ignore[return-value]

    def cancelled(self, job: str) -> bool:
        """Whether a cancel was requested."""
        return self.cancel_token(job) is not None

    def counts(self, job: str) -> Counts | None:
        """Progress numbers, or None for an unknown job."""
        f = self.fields(job)
        if not f:
            return None
        expanded = f.get("expanded") == "1"
        if "expanded_items" in f:  # a finished job keeps its numbers in the hash
            items = int(f["expanded_items"])
        else:
            items = 0
            for v in self.r.hvals(self.key(job, "slices")):  # type: ignore[union-attr]
                items += int(str(v).split(",")[0])

        def num(name: str) -> float | None:
            v = f.get(name)
            return float(v) if v not in (None, "") else None

        return Counts(
            state=f.get("state", "queued"),
            total=int(f["total"]) if expanded else None,
            expanded_items=items,
            succeeded=int(f.get("n_succeeded", 0)), failed=int(f.get("n_failed", 0)),
            skipped=int(f.get("n_skipped", 0)),
            valid=int(f["valid"]) if expanded else None,
            cancelled=f.get("cancelled") is not None, created=num("created") or 0.0,
            started=num("started"), finished=num("finished"))

    # -- expansion -----------------------------------------------------------------------------
    def advance(self, job: str, epoch: int, offset: int, next_offset: int, next_line: int,
                eof: bool, items: int, valid: int,
                failures: Sequence[ItemResult] = ()) -> int:
        """Commit a slice: record its failures and move the cursor past it, atomically;
        -1 if another expansion owns the cursor, else 1 when finalize became due."""
        return int(self._advance(
            keys=self._keys(job, "st", "cx", "inbox", "deaths", "slices"),
            args=[epoch, offset, next_offset, next_line, int(eof), items, valid, time.time(),
                  self.lease_seconds, *_result_args(failures)]))

    def touch_expansion(self, job: str, seconds: float | None = None) -> None:
        """Push the expansion's lease forward: the reconciler re-sends the step after it."""
        self.r.hset(self.key(job), "expand_at",
                    time.time() + (self.lease_seconds if seconds is None else seconds))

    def claim_outputs(self, job: str, claims: Sequence[tuple[str, int]]) -> list[int]:
        """Claim output URIs for lines; returns the owning line of each (first line wins,
        and a line re-claiming its own output keeps it)."""
        if not claims:
            return []
        key = self.key(job, "claims")
        digests = [output_digest(out) for out, _line in claims]
        pipe = self.r.pipeline(transaction=False)
        for d, (_out, line) in zip(digests, claims):
            pipe.hsetnx(key, d, line)
        won = pipe.execute()
        owners: list[int | None] = [line if ok else None
                                    for (_out, line), ok in zip(claims, won)]
        lost = [i for i, o in enumerate(owners) if o is None]
        if lost:  # already claimed: by this line on an earlier pass, or by another line
            for i, v in zip(lost, self.r.hmget(key, [digests[i] for i in lost])):
                owners[i] = int(v)  # type: ignore[arg-type]
        return [int(o) for o in owners]  # type: ignore[arg-type]

    def ranks(self, job: str, lines: Sequence[int]) -> list[int]:
        """Each line's state: 0 none, 1 failed, 2 skipped, 3 succeeded."""
        if not lines:
            return []
        args: list[Any] = []
        for ln in lines:
            args += ["GET", "u2", f"#{ln}"]
        return [int(v) for v in self.r.execute_command("BITFIELD", self.key(job, "st"), *args)]

    def final_lines(self, job: str, lines: Sequence[int]) -> list[bool]:
        """Which of ``lines`` already have a result."""
        return [r > 0 for r in self.ranks(job, lines)]

    # -- results -------------------------------------------------------------------------------
    def record(self, job: str, results: Sequence[ItemResult], *,
               cancel_token: str | None = None, push: bool = True) -> tuple[int, bool]:
        """Record results; ``(changed, finalize due)``, changed -1 for an unknown job.

        A ``cancelled`` failure counts only while the job's cancellation is ``cancel_token``
        (a resume in between makes it void). ``push=False`` records state only (results
        that are already in object storage).
        """
        if not results:
            return 0, False
        changed, due = self._record(
            keys=[*self._keys(job, "st", "cx", "inbox", "deaths", "late"), ACTIVE],
            args=[time.time(), self.lease_seconds, cancel_token or "", int(push),
                  int(any(r.untrained for r in results)),
                  *_result_args(results, records=push)])
        return int(changed), bool(due)

    def inbox_length(self, job: str) -> int:
        """Results waiting to be copied to object storage."""
        return int(self.r.llen(self.key(job, "inbox")))  # type: ignore[arg-type]

    def inbox_peek(self, job: str, n: int) -> list[str]:
        """The oldest ``n`` results waiting in the inbox (not removed)."""
        return list(self.r.lrange(self.key(job, "inbox"), 0, n - 1))  # type: ignore[arg-type]

    def inbox_drop(self, job: str, n: int) -> None:
        """Remove the oldest ``n`` results (after they were stored)."""
        self.r.ltrim(self.key(job, "inbox"), n, -1)

    def late_results(self, job: str) -> list[str]:
        """Results that arrived after the report was written."""
        return list(self.r.lrange(self.key(job, "late"), 0, -1))  # type: ignore[arg-type]

    def import_states(self, job: str, states: Iterable[tuple[int, str, str | None, bool]],
                      batch: int = 5000) -> int:
        """Record ``(line, status, code, untrained)`` of results already in object storage
        (state only, no copy kept in Redis); returns how many changed a line."""
        n = 0
        token = self.cancel_token(job)
        args: list[Any] = []
        untrained = False

        def flush() -> int:
            changed, _due = self._record(
                keys=[*self._keys(job, "st", "cx", "inbox", "deaths", "late"), ACTIVE],
                args=[time.time(), self.lease_seconds, token or "", 0, int(untrained), *args])
            return max(0, int(changed))

        for line, status, code, by_untrained in states:
            args += [line, RANK[status], int(status == "failed" and code == "cancelled"), ""]
            untrained = untrained or by_untrained
            if len(args) >= 4 * batch:
                n += flush()
                args, untrained = [], False
        if args:
            n += flush()
        return n

    # -- deaths: items in flight when their worker died ----------------------------------------
    def add_deaths(self, job: str, lines: Sequence[int]) -> None:
        """Count one more death for each line that is still unfinished."""
        if not lines or not self.exists(job):
            return
        pipe = self.r.pipeline(transaction=False)
        for ln, rank in zip(lines, self.ranks(job, lines)):
            if rank == 0:
                pipe.hincrby(self.key(job, "deaths"), str(ln), 1)
        pipe.execute()

    def deaths(self, job: str, lines: Sequence[int]) -> list[int]:
        """How often each line's worker died while it was in flight."""
        if not lines:
            return []
        values = self.r.hmget(self.key(job, "deaths"), [str(ln) for ln in lines])
        return [int(v or 0) for v in values]  # type: ignore[union-attr]

    # -- task leases ---------------------------------------------------------------------------
    # A running task holds two keys: its lease record (what it has in flight; kept a day so
    # that the next run of the same task, or the reconciler, can learn what a dead run was
    # doing) and an ``alive`` key per run, renewed every few seconds while the run lives.
    def lease_take(self, task_id: str, token: str, job: str, lines: Sequence[int], *,
                   isolated: bool = False, items: Sequence[dict[str, Any]] | None = None,
                   deadline: float | None = None) -> Lease | None:
        """Start a run of ``task_id``; returns the previous run's lease, if there was one."""
        key = LEASE_PREFIX + task_id
        previous = self.lease_of(task_id)
        mapping: dict[str, Any] = {"token": token, "job": job, "isolated": int(isolated),
                                   "lines": ",".join(str(ln) for ln in lines), "dead": 0}
        if items is not None:
            mapping["items"] = json.dumps(list(items))
        if deadline is not None:
            mapping["deadline"] = deadline
        pipe = self.r.pipeline()
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        pipe.expire(key, 86400)
        pipe.zadd(LEASES, {task_id: time.time()})
        pipe.set(f"{ALIVE_PREFIX}{task_id}:{token}", 1, px=int(self.lease_seconds * 1000))
        pipe.execute()
        return previous

    def lease_lines(self, task_id: str, lines: Sequence[int]) -> None:
        """Update the lines a running task has in flight."""
        self.r.hset(LEASE_PREFIX + task_id, "lines", ",".join(str(ln) for ln in lines))

    def lease_renew(self, task_id: str, token: str) -> bool:
        """Keep a run alive (PEXPIRE runs even when Redis is out of memory)."""
        return bool(self.r.pexpire(f"{ALIVE_PREFIX}{task_id}:{token}",
                                   int(self.lease_seconds * 1000)))

    def lease_drop(self, task_id: str, token: str | None = None) -> None:
        """End a task's lease (only this run's, when ``token`` is given)."""
        key = LEASE_PREFIX + task_id
        current = str(self.r.hget(key, "token") or "") or None
        if token is not None and current is not None and current != token:
            self.r.delete(f"{ALIVE_PREFIX}{task_id}:{token}")
            return
        pipe = self.r.pipeline()
        pipe.delete(key)
        pipe.zrem(LEASES, task_id)
        if current is not None:
            pipe.delete(f"{ALIVE_PREFIX}{task_id}:{current}")
        pipe.execute()

    def lease_of(self, task_id: str) -> Lease | None:
        """A task's lease record (live or not), or None."""
        f = self.r.hgetall(LEASE_PREFIX + task_id)
        if not f:
            return None
        lines = tuple(int(x) for x in str(f.get("lines", "")).split(",") if x)
        deadline = f.get("deadline")
        return Lease(task_id, str(f.get("token", "")), str(f.get("job", "")), lines,
                     f.get("isolated") == "1", float(deadline) if deadline else None,
                     f.get("dead") == "1")

    def lease_items(self, task_id: str) -> list[dict[str, Any]]:
        """The items a task was given (as its message carried them)."""
        raw = self.r.hget(LEASE_PREFIX + task_id, "items")
        return list(json.loads(raw)) if raw else []  # type: ignore[arg-type]

    def alive(self, task_id: str) -> bool:
        """Whether the latest run of ``task_id`` is alive."""
        lease = self.lease_of(task_id)
        return lease is not None and not lease.dead and bool(
            self.r.exists(f"{ALIVE_PREFIX}{task_id}:{lease.token}"))

    def mark_dead(self, task_id: str) -> None:
        """Record that the latest run of ``task_id`` died (its process was lost)."""
        token = str(self.r.hget(LEASE_PREFIX + task_id, "token") or "")
        if not token:
            return
        pipe = self.r.pipeline()
        pipe.hset(LEASE_PREFIX + task_id, "dead", 1)
        pipe.delete(f"{ALIVE_PREFIX}{task_id}:{token}")
        pipe.execute()

    def leases(self) -> list[tuple[str, float]]:
        """(task id, start time) of every lease record."""
        pairs: Any = self.r.zrange(LEASES, 0, -1, withscores=True)
        return [(str(t), float(sc)) for t, sc in pairs]

    def hold(self, key: str, token: str, seconds: float) -> bool:
        """Take or renew a named lock for ``seconds``; True while the caller holds it."""
        return bool(self._lease(keys=[key], args=[token, int(seconds * 1000)]))

    def release(self, key: str, token: str) -> None:
        """Release a named lock held with ``token``."""
        if self.r.get(key) == token:
            self.r.delete(key)

    # -- control -------------------------------------------------------------------------------
    def request_cancel(self, job: str) -> str:
        """Ask workers and the expansion to stop this job's items; returns the token."""
        token = secrets.token_hex(6)
        self.r.hsetnx(self.key(job), "cancelled", token)
        return str(self.r.hget(self.key(job), "cancelled"))

    def uncancel(self, job: str, max_line: int, span: int = 8192) -> int:
        """Make every ``cancelled`` line unfinished again, a bounded range at a time so
        Redis never blocks on one long script; returns how many lines were reopened."""
        self.r.hdel(self.key(job), "cancelled")
        reopened = 0
        keys = self._keys(job, "st", "cx")
        step = max(1, span // 8)
        for first in range(0, max_line // 8 + 1, step):
            reopened += int(self._uncancel(keys=keys, args=[first, first + step - 1]))
        return reopened

    def reset_for_resume(self, job: str) -> int:
        """Restart expansion from the first line under a new epoch; returns the epoch."""
        pipe = self.r.pipeline()
        pipe.hdel(self.key(job), "finalize_due", "finalize_at", "expanded", "finished",
                  "refinalize")
        pipe.hincrby(self.key(job), "epoch", 1)
        pipe.hset(self.key(job), mapping={"cursor_offset": 0, "cursor_line": 1,
                                          "state": "queued", "resumed": time.time(),
                                          "expand_at": time.time() + self.lease_seconds})
        pipe.delete(self.key(job, "slices"))
        pipe.persist(self.key(job))
        pipe.sadd(ACTIVE, job)
        res = pipe.execute()
        return int(res[1])

    def finish(self, job: str, summary: dict[str, Any], late_consumed: int = 0) -> bool:
        """Keep the summary, drop per-line state, start the TTL; False when results arrived
        after the report was built (build it again)."""
        args: list[Any] = [self.ttl, job, late_consumed]
        for k, v in summary.items():
            if v is None:
                continue
            args += [k, json.dumps(v) if isinstance(v, (dict, list)) else v]
        return bool(self._finish(keys=[*self._keys(job, "st", "cx", "inbox", "deaths",
                                                   "slices", "claims", "late"), ACTIVE],
                                 args=args))

    # -- jobs ----------------------------------------------------------------------------------
    def deactivate(self, job: str) -> None:
        """Take a job off the reconciler's list (finished or gone)."""
        self.r.srem(ACTIVE, job)

    def active_jobs(self) -> list[str]:
        """Jobs not finalized yet."""
        return sorted(self.r.smembers(ACTIVE))  # type: ignore[arg-type]

    def forget_expired(self) -> int:
        """Drop index entries whose job hash expired; returns how many."""
        gone = 0
        for start in range(0, 1_000_000, 1000):
            ids: list[str] = [str(j) for j in self.r.zrange(  # type: ignore[union-attr]
                JOBS_INDEX, start - gone, start - gone + 999)]
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for j in ids:
                pipe.exists(self.key(j))
            dead = [j for j, e in zip(ids, pipe.execute()) if not e]
            if dead:
                self.r.zrem(JOBS_INDEX, *dead)
                self.r.srem(ACTIVE, *dead)
                gone += len(dead)
        return gone

    def iter_jobs(self) -> Iterator[str]:
        """Every known job id, oldest first."""
        for j in self.r.zrange(JOBS_INDEX, 0, -1):  # type: ignore[union-attr]
            yield str(j)

    def count_by_state(self, batch: int = 1000) -> dict[str, int]:
        """How many jobs Redis knows in each state (expired ones left out)."""
        out: dict[str, int] = {}
        for start in range(0, 10_000_000, batch):
            ids = self.r.zrange(JOBS_INDEX, start, start + batch - 1)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for j in ids:  # type: ignore[union-attr]
                pipe.hget(self.key(str(j)), "state")
            for state in pipe.execute():
                if state:
                    out[str(state)] = out.get(str(state), 0) + 1
        return out
