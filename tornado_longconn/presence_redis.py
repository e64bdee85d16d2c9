"""Presence on the Redis backend: members of every process, and a TTL for dead ones.

How presence works on Redis
---------------------------

* **Join and leave** are one Lua script each (``EVALSHA``) that, atomically,
  updates the topic's member hash and user counts, records the membership
  under this process, and publishes the ``join`` / ``leave`` event on the
  topic's presence channel (through the backend's message format, so the
  events of a topic arrive in one order in every process). Reports are queued
  in the order the handlers made them and sent by one task; what is queued
  together goes in one pipeline: one round trip for a burst of joins. At most
  100,000 reports wait; past that (Redis far too slow, or gone) they are
  dropped and the next refresh rebuilds (below), as it does for reports made
  before :meth:`RedisPresence.start`.
* **Liveness.** Every ``refresh_interval`` (default ``ttl / 3``) each process
  sets its deadline (Redis ``TIME`` + ``ttl``) in a sorted set, and every
  ``reap_interval`` (default 1 s) it reaps: a script takes the processes whose
  deadline passed and removes their members, each with one ``leave`` event
  (reason ``"expired"``). Redis runs one script at a time and the script pops
  each membership it removes, so however many processes reap at once, every
  member of a dead process leaves exactly once, within ``ttl`` +
  ``reap_interval`` of the death (one small script per process and second). The refresh goes
  ahead of queued reports, so a backlog does not make a live process look dead;
  a process whose event loop stalls for longer than ``ttl`` is reaped like a
  dead one, and its next refresh reports its members again.
* **Rebuild.** The refresh also returns how many memberships Redis holds for
  this process; when that is not what the process holds (Redis restarted
  empty, this process was reaped after a long stall, a report failed while
  Redis was unreachable), the process reports its members again (``join``
  events for those Redis had lost) and removes what Redis holds that it does
  not. Members of a process that died meanwhile are not reported by anyone:
  no phantom outlives the TTL.
* **Counts in O(1):** ``HLEN`` of the member hash and of the user counts.
  **Members paged** with ``HSCAN`` (its cursor is the page cursor; ``COUNT``
  is a hint to Redis, so a page of a small topic may hold more than ``limit``).

Keys, for the key prefix ``P`` and topic ``T``: ``P{T}:pm`` (hash client ->
member JSON), ``P{T}:pu`` (hash user -> connections), ``Ppresence:procs``
(sorted set process -> deadline in ms), ``Ppresence:proc:<process>`` (set of
``T\\n<client>``); events travel on the backend topic ``presence#T``. The
scripts touch the keys of several topics, so the store needs one Redis server
(or a Sentinel-managed one), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
from collections.abc import Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError, RedisError

from ._process_leases import NOW_MS_LUA, UNAVAILABLE, ProcessLease, Script, redis_errors, text
from .backends.redis import RedisBackend
from .exceptions import BackendError, BackendUnavailableError
from .log import Message, new_epoch
from .presence import (
    USERS_PREFIX,
    Member,
    MemberPage,
    PresenceEvent,
    PresenceListener,
    PresenceStats,
    PresenceStoreStats,
    Watchers,
    check_limit,
    checked,
    events_topic,
    top_topics,
)

__all__ = ["DEFAULT_TTL", "RedisPresence"]

log = logging.getLogger("tornado_longconn.presence")

#: Seconds a process's members outlive its last refresh.
DEFAULT_TTL: Final = 30.0
# Reports sent in one pipeline at most.
_BATCH: Final = 512
# Reports waiting at most; past it (Redis too slow or gone for long) they are
# dropped and the next refresh rebuilds this process's members instead.
_MAX_QUEUE: Final = 100_000
# Memberships one reap script removes at most (it runs again while there are more).
_REAP_BUDGET: Final = 1000

_COMMON_LUA = r"""
local prefix = ARGV[1]
local function publish_event(topic, cand, body)
  local chan = prefix .. '{presence#' .. topic .. '}'
  local meta = chan .. ':m'
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    epoch = cand
    redis.call('HSET', meta, 'e', epoch, 'o', 0, 'n', 0)
  end
  local n = redis.call('HINCRBY', meta, 'n', 1)
  local t = redis.call('TIME')
  local us = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('PUBLISH', chan, '1:' .. epoch .. ':' .. n .. ':0:t' .. us .. '::' .. body)
end
local function remove(topic, client, pid, reason, cand)
  local base = prefix .. '{' .. topic .. '}'
  local m = redis.call('HGET', base .. ':pm', client)
  if not m then return 0 end
  local ok, obj = pcall(cjson.decode, m)
  if not ok or type(obj) ~= 'table' then obj = {} end
  if obj['p'] ~= pid then return 0 end
  redis.call('HDEL', base .. ':pm', client)
  local user = obj['user']
  if type(user) == 'string' then
    if redis.call('HINCRBY', base .. ':pu', user, -1) <= 0 then
      redis.call('HDEL', base .. ':pu', user)
    end
  end
  redis.call('SREM', prefix .. 'presence:proc:' .. pid, topic .. '\n' .. client)
  publish_event(topic, cand,
    '{"event":"leave","reason":"' .. reason .. '","member":' .. m .. '}')
  return 1
end
"""

# ARGV: prefix, topic, client, user ("" none), member JSON, process, epoch candidate.
_JOIN_LUA = (
    _COMMON_LUA
    + r"""
local topic, client, user, m, pid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local base = prefix .. '{' .. topic .. '}'
if redis.call('HSETNX', base .. ':pm', client, m) == 0 then return 0 end
if user ~= '' then redis.call('HINCRBY', base .. ':pu', user, 1) end
redis.call('SADD', prefix .. 'presence:proc:' .. pid, topic .. '\n' .. client)
publish_event(topic, ARGV[7], '{"event":"join","member":' .. m .. '}')
return 1
"""
)

# ARGV: prefix, topic, client, process, epoch candidate.
_LEAVE_LUA = (
    _COMMON_LUA
    + r"""
return remove(ARGV[2], ARGV[3], ARGV[4], 'left', ARGV[5])
"""
)

# ARGV: prefix, process, ttl (ms). Returns the memberships Redis holds for it.
_REFRESH_LUA = (
    NOW_MS_LUA
    + r"""
local prefix = ARGV[1]
redis.call('ZADD', prefix .. 'presence:procs', now + tonumber(ARGV[3]), ARGV[2])
return redis.call('SCARD', prefix .. 'presence:proc:' .. ARGV[2])
"""
)

# ARGV: prefix, epoch candidate, budget. Returns {removed, 1 when more may remain}.
_REAP_LUA = (
    NOW_MS_LUA
    + _COMMON_LUA
    + r"""
local procs = prefix .. 'presence:procs'
local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', now, 'LIMIT', 0, 16)
local budget = tonumber(ARGV[3])
local done = 0
for _, pid in ipairs(dead) do
  local set = prefix .. 'presence:proc:' .. pid
  while budget > 0 do
    local entries = redis.call('SPOP', set, math.min(budget, 100))
    if #entries == 0 then break end
    for _, e in ipairs(entries) do
      local i = string.find(e, '\n', 1, true)
      if i then
        done = done + remove(string.sub(e, 1, i - 1), string.sub(e, i + 1), pid, 'expired', ARGV[2])
      end
      budget = budget - 1
    end
  end
  if redis.call('SCARD', set) == 0 then redis.call('ZREM', procs, pid) end
  if budget <= 0 then return {done, 1} end
end
return {done, 0}
"""
)

_CURSOR_RE: Final = re.compile(r"[0-9]{1,20}")


_JOIN = Script(_JOIN_LUA)
_LEAVE = Script(_LEAVE_LUA)
_REFRESH = Script(_REFRESH_LUA)
_REAP = Script(_REAP_LUA)


class _Events:
    """The backend subscriber of the presence channels: turns messages into events."""

    __slots__ = ("watchers",)

    def __init__(self, watchers: Watchers) -> None:
        self.watchers = watchers

    def on_message(self, message: Message) -> None:
        topic = message.topic[len(events_topic("")) :]
        try:
            obj = json.loads(message.data)
            member = Member.decode(json.dumps(obj["member"]))
            kind = obj["event"]
        except (ValueError, KeyError, TypeError):
            log.warning("undecodable presence event on %r dropped", topic)
            self.watchers.dispatch(PresenceEvent(topic, "gap", reason="lost"))
            return
        self.watchers.dispatch(PresenceEvent(topic, kind, member, obj.get("reason")))

    def on_gap(self, topic: str, reason: str) -> None:
        self.watchers.dispatch(PresenceEvent(topic[len(events_topic("")) :], "gap", reason=reason))


class RedisPresence(ProcessLease):
    """Presence of every process that shares ``backend``'s Redis (see the module docs).

    ``ttl`` (:data:`DEFAULT_TTL` seconds): how long the members of a process
    that stopped refreshing stay; ``refresh_interval`` (default ``ttl / 3``);
    ``reap_interval`` (default 1 s, at most ``refresh_interval``): how often
    this process looks for dead processes between its refreshes;
    ``process`` (default: random) this process's id. Call :meth:`start` once
    the loop runs (it refreshes and starts the background tasks) and
    :meth:`close` at shutdown (this process's members leave at once).
    Reports never raise: when Redis is unreachable they are dropped and the
    next refresh after Redis is back rebuilds this process's members.
    Raises ``TypeError`` for a Redis Cluster backend (or any other backend).
    """

    _log = log
    _lease_name = "presence"

    def __init__(
        self,
        backend: RedisBackend,
        *,
        ttl: float = DEFAULT_TTL,
        refresh_interval: float | None = None,
        reap_interval: float | None = None,
        process: str | None = None,
    ) -> None:
        from .backends.redis_cluster import ClusterRedisBackend

        if isinstance(backend, ClusterRedisBackend) or not isinstance(backend, RedisBackend):
            raise TypeError(
                f"RedisPresence needs a RedisBackend on one Redis server or Sentinel, "
                f"not {type(backend).__name__} (its scripts use keys of many slots)"
            )
        super().__init__(
            backend,
            ttl=ttl,
            refresh_interval=refresh_interval,
            reap_interval=reap_interval,
            process=process,
            reap_default=1.0,
        )
        self._local: dict[tuple[str, str], Member] = {}
        self._joins = 0
        self._leaves = 0
        self._ops: collections.deque[tuple[Any, ...]] = collections.deque()
        self._reports = 0  # joins and leaves in _ops
        self._wake = asyncio.Event()
        self._watchers = Watchers()
        self._events = _Events(self._watchers)
        self._worker: asyncio.Task[None] | None = None
        self._epoch_candidate = new_epoch()
        #: Counters: reports sent, failed, dropped (not started, or over 100,000
        #: waiting: rebuilt instead), round trips (pipelines) to Redis of the
        #: sender, rebuilds, members reaped.
        self.counts = {
            "sent": 0,
            "failed": 0,
            "dropped": 0,
            "round_trips": 0,
            "rebuilds": 0,
            "reaped": 0,
        }

    def __repr__(self) -> str:
        return f"<RedisPresence {self.process} members={len(self._local)}>"

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start the sender and the refresh (the first refresh is sent now). Idempotent."""
        if self._worker is not None:
            return
        self._worker = asyncio.create_task(self._work(), name=f"{self!r} sender")
        await self.refresh()
        self._start_refresher()

    async def close(self) -> None:
        """This process's members leave (one event each); stop the tasks. Idempotent."""
        if self.closed:
            return
        await self._stop_refresher()
        for topic, client in list(self._local):
            self.leave_nowait(topic, client)
        if self._worker is not None:
            self._ops.append(("forget",))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.settled(), self.backend.command_timeout)
        self.closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for topic in list(self._watchers.by_topic):
            with contextlib.suppress(Exception):
                await self.backend.unsubscribe(events_topic(topic), self._events)
        self._watchers.by_topic.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- reports ------------------------------------------------------------------

    def _push(self, op: tuple[Any, ...]) -> None:
        if self._worker is None or self._reports >= _MAX_QUEUE:
            # Not started (start() rebuilds from the local members), or too far
            # behind: the next refresh rebuilds, with the events of what changed.
            self._dirty = True
            self.counts["dropped"] += 1
            return
        self._ops.append(op)
        self._reports += 1
        self._wake.set()

    def join_nowait(self, topic: str, member: Member) -> bool:
        """Report ``member`` present in ``topic`` (queued; False: already reported)."""
        key = (topic, member.client)
        if self.closed or key in self._local:
            return False
        if "\n" in topic or "\n" in member.client:  # the separator of the process's set
            log.error("presence of %r in %r refused: a newline in the name", member.client, topic)
            return False
        if member.process != self.process:
            member = Member(
                member.client,
                member.user,
                member.info,
                member.since,
                member.transport,
                self.process,
            )
        member = checked(member)
        self._local[key] = member
        self._joins += 1
        self._push(("join", topic, member))
        return True

    def leave_nowait(self, topic: str, client: str) -> bool:
        """Report ``client`` gone from ``topic`` (queued; False: not held here)."""
        if self._local.pop((topic, client), None) is None:
            return False
        self._leaves += 1
        self._push(("leave", topic, client))
        return True

    def stats(self) -> PresenceStoreStats:
        """This process's counters (see :class:`~tornado_longconn.presence.PresenceStoreStats`)."""
        return PresenceStoreStats(
            len(self._local),
            self._joins,
            self._leaves,
            self.counts["reaped"],
            self.counts["dropped"],
        )

    def topic_members(self, limit: int) -> list[tuple[str, int]]:
        """This process's members per topic, the ``limit`` topics with the most."""
        counts: dict[str, int] = {}
        for topic, _ in self._local:
            if not topic.startswith(USERS_PREFIX):
                counts[topic] = counts.get(topic, 0) + 1
        return top_topics(counts, limit)

    def local_members(self) -> int:
        """Memberships this process holds."""
        return len(self._local)

    async def settled(self) -> None:
        """Wait until every report made before this call was sent (or failed)."""
        if self._worker is None or self._worker.done():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.append(("mark", future))  # never dropped, unlike reports
        self._wake.set()
        await future

    async def refresh(self) -> None:
        """Refresh and reap now (the refresh task does it every ``refresh_interval``)."""
        if self._worker is None:
            return
        # First in line: a backlog of reports must not make this process look dead.
        await self._queue_first("refresh")

    # -- the sender -----------------------------------------------------------------

    async def _work(self) -> None:
        client: Any = self.backend.redis
        with contextlib.suppress(RedisError, *UNAVAILABLE):  # else loaded on first NOSCRIPT
            pipe = client.pipeline(transaction=False)
            for script in (_JOIN, _LEAVE, _REFRESH, _REAP):
                pipe.script_load(script.text)
            await pipe.execute()
        ops = self._ops
        while True:
            if not ops:
                self._wake.clear()
                await self._wake.wait()
            batch: list[tuple[Any, ...]] = []
            while ops and len(batch) < _BATCH and ops[0][0] in ("join", "leave"):
                batch.append(ops.popleft())
            if batch:
                self._reports -= len(batch)
                await self._send(batch)
                continue
            op = ops.popleft()
            kind = op[0]
            if kind == "mark":
                if not op[1].done():
                    op[1].set_result(None)
            elif kind in ("refresh", "reap"):
                try:
                    with self._failing_open("refresh"):  # a failure must not stop the sender
                        if kind == "reap":
                            await self._reap()
                        else:
                            # Redis holds what this process holds only when no report waits.
                            await self._refresh(None if self._reports else len(self._local))
                finally:
                    if not op[1].done():
                        op[1].set_result(None)
            elif kind == "forget":
                with contextlib.suppress(BackendError, RedisError, *UNAVAILABLE):
                    pipe = self.backend.redis.pipeline(transaction=False)
                    pipe.zrem(self.prefix + "presence:procs", self.process)
                    pipe.delete(self._proc_key())
                    await pipe.execute()

    def _proc_key(self) -> str:
        return f"{self.prefix}presence:proc:{self.process}"

    def _op_args(self, op: tuple[Any, ...]) -> tuple[Script, list[Any]]:
        if op[0] == "join":
            topic, member = op[1], op[2]
            return _JOIN, [
                self.prefix,
                topic,
                member.client,
                member.user or "",
                member.encode(),
                self.process,
                self._epoch_candidate,
            ]
        return _LEAVE, [self.prefix, op[1], op[2], self.process, self._epoch_candidate]

    async def _run(self, calls: Sequence[tuple[Script, list[Any]]]) -> list[Any]:
        """Run scripts in one pipeline (loading them once if Redis lost its script cache)."""
        client: Any = self.backend.redis
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            for script, args in calls:
                pipe.execute_command("EVALSHA", script.sha, 0, *args)
            self.counts["round_trips"] += 1
            try:
                results: list[Any] = await pipe.execute(raise_on_error=False)
            except UNAVAILABLE as exc:
                raise BackendUnavailableError(f"Redis is unavailable: {exc}") from exc
            missing = [r for r in results if isinstance(r, NoScriptError)]
            if missing and attempt == 0:
                load = client.pipeline(transaction=False)
                for script in {s.sha: s for s, _ in calls}.values():
                    load.script_load(script.text)
                await load.execute()
                # Scripts that ran did their work: run again only those that did not.
                calls = [
                    c for c, r in zip(calls, results, strict=True) if isinstance(r, NoScriptError)
                ]
                again = await self._run(calls)
                it = iter(again)
                return [next(it) if isinstance(r, NoScriptError) else r for r in results]
            for result in results:
                if isinstance(result, Exception):
                    raise BackendError(f"Redis refused a presence script: {result}")
            return results
        raise AssertionError("unreachable")

    async def _send(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            await self._run([self._op_args(op) for op in batch])
            self.counts["sent"] += len(batch)
        except (BackendError, RedisError, *UNAVAILABLE) as exc:
            # Some may have run; the next refresh compares and rebuilds.
            self._dirty = True
            self.counts["failed"] += len(batch)
            log.warning("presence reports failed (rebuilt at the next refresh): %s", exc)
        except Exception:  # a bug must not stop the sender
            self._dirty = True
            self.counts["failed"] += len(batch)
            log.exception("presence reports failed")

    async def _refresh(self, expected: int | None) -> None:
        """Set the deadline; rebuild when Redis holds other than ``expected`` (None: no check)."""
        held = await self._run([(_REFRESH, [self.prefix, self.process, self._ttl_ms])])
        if expected is not None and self._take_dirty(int(held[0]) != expected):
            self.counts["rebuilds"] += 1
            await self._rebuild()
        await self._reap()

    async def _reap(self) -> None:
        """Remove the members of every process whose deadline passed (each once)."""
        while True:
            removed, more = (
                await self._run([(_REAP, [self.prefix, self._epoch_candidate, _REAP_BUDGET])])
            )[0]
            self.counts["reaped"] += int(removed)
            if not int(more):
                break

    async def _rebuild(self) -> None:
        """Report every local member again; remove what Redis holds for us that we do not."""
        members = list(self._local.items())
        for start in range(0, len(members), _BATCH):
            chunk = members[start : start + _BATCH]
            await self._run([self._op_args(("join", t, m)) for (t, _c), m in chunk])
        client: Any = self.backend.redis
        stale: list[tuple[str, str]] = []
        async for raw in client.sscan_iter(self._proc_key(), count=500):
            entry = text(raw)
            topic, _, member_client = entry.partition("\n")
            if (topic, member_client) not in self._local:
                stale.append((topic, member_client))
        for start in range(0, len(stale), _BATCH):
            gone = stale[start : start + _BATCH]
            await self._run([self._op_args(("leave", t, c)) for t, c in gone])

    async def _lease_refresh(self) -> None:
        await self.refresh()

    async def _lease_reap(self) -> None:
        await self._queue_first("reap")

    async def _queue_first(self, kind: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.appendleft((kind, future))
        self._wake.set()
        await future

    # -- readers -------------------------------------------------------------------------

    async def presence(
        self, topic: str, *, cursor: str | None = None, limit: int | None = None
    ) -> MemberPage:
        """A page of ``topic``'s members on every process (``HSCAN``; cursor opaque).

        Raises ``ValueError`` for a cursor this store did not hand out,
        :class:`~tornado_longconn.exceptions.BackendUnavailableError` when Redis
        cannot be reached.
        """
        if cursor is not None and not _CURSOR_RE.fullmatch(cursor):
            raise ValueError("not a presence cursor")
        client: Any = self.backend.redis
        with redis_errors("the operation"):
            next_cursor, items = await client.hscan(
                f"{self.prefix}{{{topic}}}:pm", int(cursor or 0), count=check_limit(limit)
            )
        members = []
        for value in items.values():
            try:
                members.append(Member.decode(value))
            except ValueError:
                continue
        nxt = int(next_cursor)
        return MemberPage(tuple(members), None if nxt == 0 else str(nxt))

    async def presence_stats(self, topic: str) -> PresenceStats:
        """``topic``'s counts: two ``HLEN`` in one round trip."""
        client: Any = self.backend.redis
        base = f"{self.prefix}{{{topic}}}"
        with redis_errors("the operation"):
            pipe = client.pipeline(transaction=False)
            pipe.hlen(base + ":pm")
            pipe.hlen(base + ":pu")
            connections, users = await pipe.execute()
        return PresenceStats(int(connections), int(users))

    async def watch(self, topic: str, listener: PresenceListener) -> None:
        """Call ``listener`` with ``topic``'s events once Redis confirmed the subscription."""
        if self._watchers.add(topic, listener):
            await self.backend.subscribe(events_topic(topic), self._events)

    def unwatch(self, topic: str, listener: PresenceListener) -> None:
        """Stop calling ``listener`` (the channel is left when no listener remains)."""
        if self._watchers.remove(topic, listener) and not self.closed:
            self._background(self._leave_channel(topic))

    async def _leave_channel(self, topic: str) -> None:
        if topic not in self._watchers.by_topic:  # not watched again meanwhile
            await self.backend.unsubscribe(events_topic(topic), self._events)
