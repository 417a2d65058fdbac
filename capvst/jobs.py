"""Job state in Redis: one hash per job plus per-item hashes, all updates idempotent.

Recording the same item twice counts once (a Lua script makes check-and-count atomic); a
later, better outcome of the same item (``succeeded`` over ``skipped`` over ``failed``)
replaces the earlier one without changing the total. Object storage stays the source of
truth: :mod:`scheduler.client` can rebuild all of this after Redis lost it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
from pydantic import BaseModel, ConfigDict
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .manifest import JobOptions, ManifestFormat

Status = Literal["succeeded", "skipped", "failed"]
STATUSES: tuple[Status, ...] = ("succeeded", "skipped", "failed")
PREFIX = "capvst:job:"
JOBS_INDEX = "capvst:jobs"

_COMPLETE = """
local function complete(job)
  local v = redis.call('HMGET', job, 'expanded', 'total', 'n_succeeded', 'n_failed',
                       'n_skipped', 'finalize_queued')
  if v[1] == '1' and not v[6] then
    local done = (tonumber(v[3]) or 0) + (tonumber(v[4]) or 0) + (tonumber(v[5]) or 0)
    if done >= (tonumber(v[2]) or 0) then
      redis.call('HSET', job, 'finalize_queued', '1')
      return 1
    end
  end
  return 0
end
"""

# KEYS: job, results   ARGV: line, status, record json
# returns {changed (0 none, 1 new, 2 upgraded), finalize due (0/1)}
_RECORD = _COMPLETE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local rank = {failed = 1, skipped = 2, succeeded = 3}
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local changed = 1
if prev then
  local old = cjson.decode(prev)['status']
  if rank[ARGV[2]] <= rank[old] then return {0, 0} end
  redis.call('HINCRBY', KEYS[1], 'n_' .. old, -1)
  changed = 2
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'n_' .. ARGV[2], 1)
return {changed, complete(KEYS[1])}
"""

# KEYS: job, slice item counts, slice valid counts
# ARGV: epoch, slice offset, next offset, next line, eof, items in slice, valid in slice
# returns -1 when another expansion owns the cursor, else finalize due (0/1)
_ADVANCE = _COMPLETE + """
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'cursor_offset')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[6])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[7])
redis.call('HSET', KEYS[1], 'cursor_offset', ARGV[3], 'cursor_line', ARGV[4])
if ARGV[5] == '1' then
  local total, valid = 0, 0
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(v) end
  for _, v in ipairs(redis.call('HVALS', KEYS[3])) do valid = valid + tonumber(v) end
  redis.call('HSET', KEYS[1], 'expanded', '1', 'total', total, 'valid', valid,
             'max_line', tonumber(ARGV[4]) - 1)
  return complete(KEYS[1])
end
return 0
"""

# KEYS: job, results   drop 'cancelled' failures so resume runs those items again
_UNCANCEL = """
local cursor, removed = '0', 0
repeat
  local r = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', 1000)
  cursor = r[1]
  for i = 1, #r[2], 2 do
    local rec = cjson.decode(r[2][i + 1])
    if rec['status'] == 'failed' and rec['error'] and rec['error']['code'] == 'cancelled' then
      redis.call('HDEL', KEYS[2], r[2][i])
      removed = removed + 1
    end
  end
until cursor == '0'
if removed > 0 then redis.call('HINCRBY', KEYS[1], 'n_failed', -removed) end
return removed
"""


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


class JobStore:
    """Typed access to the Redis keys of jobs."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 14 * 86400) -> None:
        self.r = client
        self.ttl = ttl_seconds
        self._record = client.register_script(_RECORD)
        self._advance = client.register_script(_ADVANCE)
        self._uncancel = client.register_script(_UNCANCEL)

    # -- keys ----------------------------------------------------------------------------------
    @staticmethod
    def key(job: str, part: str = "") -> str:
        """Redis key of a job's hash or one of its per-item hashes."""
        return f"{PREFIX}{job}" + (f":{part}" if part else "")

    def _all_keys(self, job: str) -> list[str]:
        return [self.key(job)] + [self.key(job, p) for p in
                                  ("results", "outputs", "starts", "tries", "slices",
                                   "slices_valid")]

    # -- the job -------------------------------------------------------------------------------
    def create(self, rec: JobRecord, state: str = "queued") -> None:
        """Store a new job (or re-create one whose keys were lost)."""
        fields = {"record": rec.model_dump_json(), "state": state, "created": rec.created,
                  "epoch": 0, "cursor_offset": 0, "cursor_line": 1, "n_succeeded": 0,
                  "n_failed": 0, "n_skipped": 0}
        pipe = self.r.pipeline()
        pipe.hset(self.key(rec.id), mapping=fields)  # type: ignore[arg-type]
        pipe.zadd(JOBS_INDEX, {rec.id: rec.created})
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
        """Set job fields."""
        self.r.hset(self.key(job), mapping={k: (json.dumps(v) if isinstance(v, (dict, list))
                                                 else v) for k, v in fields.items()})

    def set_if_absent(self, job: str, field: str, value: Any) -> bool:
        """Set a field once; True if this call set it."""
        return bool(self.r.hsetnx(self.key(job), field, value))

    def cancelled(self, job: str) -> bool:
        """Whether a cancel was requested."""
        return self.r.hget(self.key(job), "cancelled") == "1"

    def counts(self, job: str) -> Counts | None:
        """Progress numbers, or None for an unknown job."""
        f = self.fields(job)
        if not f:
            return None
        slices = self.r.hvals(self.key(job, "slices"))

        def num(name: str) -> float | None:
            v = f.get(name)
            return float(v) if v not in (None, "") else None

        return Counts(
            state=f.get("state", "queued"),
            total=int(f["total"]) if f.get("expanded") == "1" else None,
            expanded_items=sum(int(v) for v in slices),
            succeeded=int(f.get("n_succeeded", 0)), failed=int(f.get("n_failed", 0)),
            skipped=int(f.get("n_skipped", 0)),
            valid=int(f["valid"]) if f.get("expanded") == "1" else None,
            cancelled=f.get("cancelled") == "1", created=num("created") or 0.0,
            started=num("started"), finished=num("finished"))

    # -- expansion -----------------------------------------------------------------------------
    def advance(self, job: str, epoch: int, offset: int, next_offset: int, next_line: int,
                eof: bool, items: int, valid: int) -> int:
        """Move the expansion cursor past a slice; -1 if another expansion owns it, else 1
        when the job just became complete (finalize is due), 0 otherwise."""
        return int(self._advance(keys=[self.key(job), self.key(job, "slices"),
                                       self.key(job, "slices_valid")],
                                 args=[epoch, offset, next_offset, next_line, int(eof), items,
                                       valid]))

    def claim_outputs(self, job: str, claims: Sequence[tuple[str, int]]) -> list[int]:
        """Claim output URIs for lines; returns the owning line of each (first line wins,
        and a line re-claiming its own output keeps it)."""
        if not claims:
            return []
        key = self.key(job, "outputs")
        pipe = self.r.pipeline(transaction=False)
        for out, line in claims:
            pipe.hsetnx(key, out, line)
        won = pipe.execute()
        owners = [line if ok else None for (_out, line), ok in zip(claims, won)]
        lost = [i for i, o in enumerate(owners) if o is None]
        if lost:  # already claimed: by this line on an earlier pass, or by another line
            for i, v in zip(lost, self.r.hmget(key, [claims[i][0] for i in lost])):
                owners[i] = int(v)  # type: ignore[arg-type]
        return [int(o) for o in owners]  # type: ignore[arg-type]

    def final_lines(self, job: str, lines: Sequence[int]) -> list[bool]:
        """Which of ``lines`` already have a result."""
        if not lines:
            return []
        values = self.r.hmget(self.key(job, "results"), [str(ln) for ln in lines])
        return [v is not None for v in values]  # type: ignore[union-attr]

    # -- items ---------------------------------------------------------------------------------
    def start_item(self, job: str, line: int) -> int:
        """Count one more delivery of an item reaching a worker; returns the count."""
        return int(self.r.hincrby(self.key(job, "starts"), str(line), 1))

    def count_try(self, job: str, line: int) -> int:
        """Count one more attempt (deliveries and retries); returns the count."""
        return int(self.r.hincrby(self.key(job, "tries"), str(line), 1))

    def tries(self, job: str, line: int) -> int:
        """Attempts so far."""
        return int(self.r.hget(self.key(job, "tries"), str(line)) or 0)

    def record(self, job: str, result: dict[str, Any]) -> tuple[int, bool]:
        """Store an item's final result; (0 ignored / 1 new / 2 upgraded, finalize due)."""
        status = result["status"]
        if status not in STATUSES:
            raise ValueError(f"bad status {status!r}")
        changed, due = self._record(keys=[self.key(job), self.key(job, "results")],
                                    args=[result["line"], status, json.dumps(result)])
        return int(changed), bool(due)

    def result(self, job: str, line: int) -> dict[str, Any] | None:
        """The recorded result of a line."""
        raw = self.r.hget(self.key(job, "results"), str(line))
        return json.loads(raw) if raw else None  # type: ignore[arg-type]

    def iter_results(self, job: str, max_line: int, batch: int = 2000
                     ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(line, result or None) for lines 1..max_line, in order, in bounded batches."""
        for start in range(1, max_line + 1, batch):
            lines = [str(n) for n in range(start, min(max_line, start + batch - 1) + 1)]
            values = self.r.hmget(self.key(job, "results"), lines)
            for ln, raw in zip(lines, values):  # type: ignore[arg-type]
                yield int(ln), (json.loads(raw) if raw else None)

    def iter_failed(self, job: str) -> Iterator[dict[str, Any]]:
        """Every failed result (unordered, streamed)."""
        for _line, raw in self.r.hscan_iter(self.key(job, "results"), count=1000):
            rec = json.loads(raw)
            if rec.get("status") == "failed":
                yield rec

    def import_results(self, job: str, results: Iterable[dict[str, Any]]) -> int:
        """Record results read back from object storage; returns how many were new."""
        n = 0
        for rec in results:
            changed, _ = self.record(job, rec)
            n += changed == 1
        return n

    # -- control -------------------------------------------------------------------------------
    def request_cancel(self, job: str) -> None:
        """Ask workers and the expansion to stop this job's items."""
        self.set(job, cancelled=1)

    def reset_for_resume(self, job: str) -> int:
        """Restart expansion from the first line under a new epoch; un-cancel; returns the
        new epoch."""
        if self.cancelled(job):
            self._uncancel(keys=[self.key(job), self.key(job, "results")])
        pipe = self.r.pipeline()
        pipe.hdel(self.key(job), "cancelled", "finalize_queued", "expanded", "finished")
        pipe.hincrby(self.key(job), "epoch", 1)
        pipe.hset(self.key(job), mapping={"cursor_offset": 0, "cursor_line": 1,
                                          "state": "queued", "resumed": time.time()})
        pipe.delete(self.key(job, "slices"), self.key(job, "slices_valid"))
        for k in self._all_keys(job):
            pipe.persist(k)
        res = pipe.execute()
        return int(res[1])

    def expire(self, job: str) -> None:
        """Let a finished job's keys go after the TTL."""
        pipe = self.r.pipeline()
        for k in self._all_keys(job):
            pipe.expire(k, self.ttl)
        pipe.execute()
