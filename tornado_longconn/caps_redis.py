"""Connection caps counted across processes in Redis, released when a process dies.

:class:`RedisConnectionCaps` is the :class:`~tornado_longconn.ratelimit.ConnectionCapStore`
of the Redis backend: ``max_connections_per_ip`` and ``max_connections_per_user``
then hold for the sum of the connections of every process that shares the
Redis server (and key prefix), not per process.

How it counts
-------------

* **One round trip per accept and per close.** Accepting is one Lua script:
  for each cap it reads the key's hash (process -> connections), drops the
  fields of dead processes, refuses when the live sum is at the limit (undoing
  what it counted for earlier caps of the same connection), else adds one to
  this process's field. Closing is one script that takes one off.
* **A dead process cannot leak counts.** Every ``refresh_interval`` (default
  ``ttl / 3``) each process sets its deadline (Redis ``TIME`` + ``ttl``) in a
  sorted set. A field whose process's deadline passed is not counted by the
  accept script (so a killed process's connections stop counting at most
  ``ttl`` after its last refresh) and the refresh removes dead processes'
  fields for good. A process whose deadline lapsed while it lived (its loop
  stalled, Redis restarted empty) or whose close failed writes its own counts
  again at its next refresh.
* **Redis unreachable: fail open.** An accept that cannot reach Redis is let
  through, counted in this process only (``counts["unavailable"]``), and
  written to Redis at the first refresh that succeeds: an outage of Redis does
  not refuse every client.

Keys, for the key prefix ``P``: ``P{caps}:procs`` (sorted set process ->
deadline in ms), ``P{caps}:c:<kind>:<key>`` (hash process -> connections),
``P{caps}:p:<process>`` (set of the hashes a process counts in). The scripts
touch several keys, so the store needs one Redis server (or a Sentinel-managed
one), not a Redis Cluster.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError, RedisError

from ._process_leases import NOW_MS_LUA, UNAVAILABLE, ProcessLease, Script, redis_errors, text
from .backends.redis import RedisBackend
from .exceptions import BackendError

__all__ = ["DEFAULT_CAPS_TTL", "RedisConnectionCaps"]

log = logging.getLogger("tornado_longconn.ratelimit")

#: Seconds the connections of a process that stopped refreshing keep counting.
DEFAULT_CAPS_TTL: Final = 30.0
# Dead processes one refresh removes at most.
_REAP_BUDGET: Final = 100

# The start of every script: ARGV[1] is the key prefix.
_CAPS_LUA = r"""
local base = ARGV[1] .. '{caps}'
-- Takes one connection of process p off hash h.
local function count_out(h, p)
  if redis.call('HINCRBY', h, p, -1) <= 0 then
    redis.call('HDEL', h, p)
    redis.call('SREM', base .. ':p:' .. p, h)
  end
end
-- Removes every count of process p; returns the key of its set of hashes.
local function drop_counts(p)
  local pk = base .. ':p:' .. p
  for _, h in ipairs(redis.call('SMEMBERS', pk)) do
    redis.call('HDEL', h, p)
  end
  redis.call('DEL', pk)
  return pk
end
"""

_ACQUIRE_LUA = (
    NOW_MS_LUA
    + _CAPS_LUA
    + r"""
local pid, n = ARGV[2], tonumber(ARGV[3])
local procs = base .. ':procs'
local done = {}
for i = 0, n - 1 do
  local kind, key, limit = ARGV[4 + 3 * i], ARGV[5 + 3 * i], tonumber(ARGV[6 + 3 * i])
  local h = base .. ':c:' .. kind .. ':' .. key
  local all = redis.call('HGETALL', h)
  local total = 0
  for j = 1, #all, 2 do
    local p = all[j]
    local deadline = redis.call('ZSCORE', procs, p)
    if p ~= pid and (not deadline or tonumber(deadline) < now) then
      redis.call('HDEL', h, p)
    else
      total = total + tonumber(all[j + 1])
    end
  end
  if total >= limit then
    for _, hk in ipairs(done) do
      count_out(hk, pid)
    end
    return {0, kind}
  end
  redis.call('HINCRBY', h, pid, 1)
  redis.call('SADD', base .. ':p:' .. pid, h)
  done[#done + 1] = h
end
return {1, ''}
"""
)

_RELEASE_LUA = (
    _CAPS_LUA
    + r"""
local pid, n = ARGV[2], tonumber(ARGV[3])
for i = 0, n - 1 do
  count_out(base .. ':c:' .. ARGV[4 + 2 * i] .. ':' .. ARGV[5 + 2 * i], pid)
end
return 1
"""
)

# Sets this process's deadline (returns 1 when it was not there: write counts
# again), then removes the fields of at most ARGV[4] dead processes.
_REFRESH_LUA = (
    NOW_MS_LUA
    + _CAPS_LUA
    + r"""
local pid, ttl, budget = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local procs = base .. ':procs'
local added = redis.call('ZADD', procs, now + ttl, pid)
local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', '(' .. now, 'LIMIT', 0, budget)
for _, p in ipairs(dead) do
  drop_counts(p)
  redis.call('ZREM', procs, p)
end
return {added, #dead}
"""
)

# Replaces this process's counts with ARGV's (kind, key, count) triples.
_REWRITE_LUA = (
    _CAPS_LUA
    + r"""
local pid, n = ARGV[2], tonumber(ARGV[3])
local pk = drop_counts(pid)
for i = 0, n - 1 do
  local h = base .. ':c:' .. ARGV[4 + 3 * i] .. ':' .. ARGV[5 + 3 * i]
  redis.call('HSET', h, pid, ARGV[6 + 3 * i])
  redis.call('SADD', pk, h)
end
return 1
"""
)

# Forgets this process (at close).
_FORGET_LUA = (
    _CAPS_LUA
    + r"""
drop_counts(ARGV[2])
redis.call('ZREM', base .. ':procs', ARGV[2])
return 1
"""
)

_COUNT_LUA = (
    NOW_MS_LUA
    + _CAPS_LUA
    + r"""
local kind, key = ARGV[2], ARGV[3]
local all = redis.call('HGETALL', base .. ':c:' .. kind .. ':' .. key)
local total = 0
for j = 1, #all, 2 do
  local deadline = redis.call('ZSCORE', base .. ':procs', all[j])
  if deadline and tonumber(deadline) >= now then total = total + tonumber(all[j + 1]) end
end
return total
"""
)


_ACQUIRE = Script(_ACQUIRE_LUA)
_RELEASE = Script(_RELEASE_LUA)
_REFRESH = Script(_REFRESH_LUA)
_REWRITE = Script(_REWRITE_LUA)
_FORGET = Script(_FORGET_LUA)
_COUNT = Script(_COUNT_LUA)


class RedisConnectionCaps(ProcessLease):
    """Connection caps summed over every process on ``backend``'s Redis (see the module docs).

    ``ttl`` (:data:`DEFAULT_CAPS_TTL` seconds): how long the connections of a
    process that stopped refreshing keep counting; ``refresh_interval``
    (default ``ttl / 3``); ``process`` (default: random) this process's id.
    Call :meth:`start` once the loop runs (before serving: a process that
    never refreshed is counted as dead by the others) and :meth:`close` at
    shutdown (this process's counts go at once). Put it in the application
    setting ``longconn_connection_caps``.
    """

    _log = log
    _lease_name = "connection caps"

    def __init__(
        self,
        backend: RedisBackend,
        *,
        ttl: float = DEFAULT_CAPS_TTL,
        refresh_interval: float | None = None,
        process: str | None = None,
    ) -> None:
        super().__init__(backend, ttl=ttl, refresh_interval=refresh_interval, process=process)
        # (kind, key) -> connections this process holds.
        self._local: dict[tuple[str, str], int] = {}
        #: Counters: connections accepted, refused, released; accepts let through
        #: while Redis was unreachable; releases that failed; round trips to
        #: Redis; rewrites of this process's counts; dead processes removed.
        self.counts = {
            "acquired": 0,
            "refused": 0,
            "released": 0,
            "unavailable": 0,
            "failed": 0,
            "round_trips": 0,
            "rewrites": 0,
            "reaped": 0,
        }

    def __repr__(self) -> str:
        return f"<RedisConnectionCaps {self.process} keys={len(self._local)}>"

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Refresh now, then every ``refresh_interval`` in a task. Idempotent."""
        if self._refresher is not None:
            return
        await self.refresh()
        self._start_refresher()

    async def close(self) -> None:
        """Stop refreshing and remove this process's counts from Redis. Idempotent."""
        if self.closed:
            return
        self.closed = True
        await self._stop_refresher()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(BackendError, RedisError, *UNAVAILABLE):
            await self._run(_FORGET, [self.prefix, self.process])
        self._local.clear()

    async def refresh(self) -> None:
        """Set this process's deadline, remove dead processes' counts, rewrite ours if needed.

        Raises :class:`~tornado_longconn.exceptions.BackendUnavailableError`
        when Redis cannot be reached (the refresh task logs it and tries again).
        """
        added, reaped = await self._run(
            _REFRESH, [self.prefix, self.process, self._ttl_ms, _REAP_BUDGET]
        )
        self.counts["reaped"] += int(reaped)
        if self._take_dirty(bool(int(added) and self._local)):
            self.counts["rewrites"] += 1
            args: list[Any] = [self.prefix, self.process, len(self._local)]
            for (kind, key), count in self._local.items():
                args += [kind, key, count]
            await self._run(_REWRITE, args)

    async def _lease_refresh(self) -> None:
        await self.refresh()

    # -- the store ----------------------------------------------------------------

    async def acquire_connection(
        self, wanted: Sequence[tuple[str, str | None, int | None]]
    ) -> tuple[Any, str | None]:
        """Count a connection in under every ``(kind, key, limit)`` on every process.

        One round trip. Returns ``(held, None)`` or ``([], kind)`` for the
        first full cap (see :class:`~tornado_longconn.ratelimit.ConnectionCapStore`).
        When Redis cannot be reached the connection is let through and counted
        here (``counts["unavailable"]``).
        """
        caps = [(kind, key, limit) for kind, key, limit in wanted if key is not None and limit]
        if not caps:
            return [], None
        args: list[Any] = [self.prefix, self.process, len(caps)]
        for kind, key, limit in caps:
            args += [kind, key, limit]
        held = [(kind, key) for kind, key, _ in caps]
        try:
            ok, kind = await self._run(_ACQUIRE, args)
        except (BackendError, RedisError, *UNAVAILABLE) as exc:
            self.counts["unavailable"] += 1
            self._dirty = True
            log.warning("connection caps: Redis unavailable, connection let through: %s", exc)
        else:
            if not int(ok):
                self.counts["refused"] += 1
                return [], text(kind)
        self.counts["acquired"] += 1
        for pair in held:
            self._local[pair] = self._local.get(pair, 0) + 1
        return held, None

    def release_connection(self, held: Any) -> None:
        """Count out what :meth:`acquire_connection` held (one round trip, in a task)."""
        pairs: list[tuple[str, str]] = list(held)
        if not pairs:
            return
        for pair in pairs:
            count = self._local.get(pair, 0) - 1
            if count > 0:
                self._local[pair] = count
            else:
                self._local.pop(pair, None)
        self.counts["released"] += 1
        if self.closed:
            return
        args: list[Any] = [self.prefix, self.process, len(pairs)]
        for kind, key in pairs:
            args += [kind, key]
        self._background(self._release(args))

    async def _release(self, args: list[Any]) -> None:
        try:
            await self._run(_RELEASE, args)
        except (BackendError, RedisError, *UNAVAILABLE) as exc:
            self._dirty = True  # the next refresh writes our counts again
            self.counts["failed"] += 1
            log.warning("connection caps: release failed (rewritten at the next refresh): %s", exc)

    async def count(self, kind: str, key: str) -> int:
        """Connections of ``key`` under ``kind`` (``"ip"``, ``"user"``) on every live process."""
        return int(await self._run(_COUNT, [self.prefix, kind, key]))

    def local_count(self, kind: str, key: str) -> int:
        """Connections of ``key`` under ``kind`` that this process holds."""
        return self._local.get((kind, key), 0)

    async def _run(self, script: Script, args: list[Any]) -> Any:
        """Run one script (loading it if Redis lost its script cache)."""
        client: Any = self.backend.redis
        self.counts["round_trips"] += 1
        with redis_errors("a connection caps script"):
            try:
                return await client.evalsha(script.sha, 0, *args)
            except NoScriptError:
                return await client.eval(script.text, 0, *args)
