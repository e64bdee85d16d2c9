"""Upload state shared by every process that serves one storage: locks, offsets, metadata.

N processes (on one host or many) that share an upload directory (a local disk, NFS,
a mounted volume) serve the same uploads when their
:class:`~tornado_longconn.upload.UploadStore` is given one
:class:`SharedUploadState`::

    state = RedisUploadState("redis://10.0.0.5:6379/0", prefix="uploads:")
    store = UploadStore("/mnt/uploads", shared=state)

The contract (:class:`SharedUploadState`, kept by :class:`MemoryUploadState` for one
process and tests, and by :class:`RedisUploadState` for many):

* **A commit.** :meth:`~SharedUploadState.commit` is how a tus PATCH appends without
  the lock, in one round trip: its body went to a segment file of its own; the commit
  moves the record's offset from the request's offset to the end of the segment only
  if the offset is still that (a compare-and-set: of two writers at one offset exactly
  one commits, the other deletes its segment and answers 409), the upload is active,
  within its size, not expired and not locked. The segment joins the record's
  ``pending`` list (committed, maybe not yet copied into the partial file); the
  committer copies every pending segment whose file still exists, and reports them
  copied at its next commit. A segment file is deleted only once copied, so one that
  is gone was copied.
* **A writer lock with an expiry.** :meth:`~SharedUploadState.lock` takes an upload
  for one writer (``owner``, a random token per request) for ``ttl`` seconds, or
  answers None if another owner holds it (the tus handler answers 423). The holder
  extends it while it writes; a holder that dies (``kill -9``, a lost host) stops
  extending, and the upload is free again ``ttl`` seconds later.
* **A generation.** Every lock, unlock and commit adds 1 to the upload's generation. A
  process trusts what it keeps in memory about an upload (offset, running sha256)
  only if the generation says that no other process locked it since: otherwise it
  reloads the upload from the shared disk (re-hashing the partial file).
* **A record.** The upload's declared size, durable offset, metadata, status and
  concatenation, as JSON. The writer updates it before it answers a request, so a
  HEAD answered by any process gives an offset a client can resume at. The record is
  the truth about the offset: a locked writer that died between writing bytes and
  recording them leaves bytes past the recorded offset, and the next writer cuts
  them off before it appends (no client was ever told of them); the next locked
  writer also copies the pending segments first. A record that is
  lost (a Redis flushed or replaced) is not fatal: the upload is read from the disk
  until its next writer records it again.

Keys of :class:`RedisUploadState` (``P`` the prefix, ``I`` the upload id): ``Pupload:I``
(hash: ``gen``, ``rec``) and ``Pupload:I:lock`` (the owner token, with a ``PX``
expiry). Records have no expiry: they are removed with their upload (DELETE, expiry
sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from tornado_longconn.exceptions import UploadError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "CommitResult",
    "MemoryUploadState",
    "RedisUploadState",
    "SharedUploadRecord",
    "SharedUploadState",
    "UploadStateUnavailable",
]


_T = TypeVar("_T")
_log = logging.getLogger("tornado_longconn.upload")


class UploadStateUnavailable(UploadError):
    """The shared upload state could not be reached (Redis down, timed out, ...).

    An :class:`~tornado_longconn.exceptions.UploadError` with status 503 and
    ``retry_after`` seconds: the tus handler answers ``503`` with ``Retry-After`` (tus
    clients retry; nothing of the upload was touched) and counts it in
    ``stats().state_errors``. The client library's error is kept as ``__cause__``.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, status=503, retry_after=retry_after)


@dataclass(frozen=True, slots=True)
class SharedUploadRecord:
    """What every process knows about one upload."""

    #: Locks plus unlocks so far (0 for a new upload).
    generation: int
    #: The record (JSON-ready): ``size`` (None while deferred), ``offset``,
    #: ``metadata``, ``status`` (``"active"``/``"complete"``), ``concat``, ``parts``,
    #: ``sha256``, ``activity`` (time of the last stored byte), ``created``. None if
    #: the upload has a generation but no record (it was never recorded).
    data: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`SharedUploadState.commit` answers.

    ``reason`` is None when the segment was committed, else why not: ``"missing"``
    (no record), ``"locked"`` (a writer holds the lock), ``"complete"`` (the upload
    is no longer active), ``"offset"`` (the offset moved: another writer committed
    first), ``"size"`` (past the declared size) or ``"expired"`` (idle past
    ``expire_after``). Nothing changes when it is refused.
    """

    #: None if committed, else the refusal (see above).
    reason: str | None
    #: The record's offset after the call (the new one, or the current one if refused).
    offset: int
    #: The generation before the call (-1 if there was no record).
    previous: int
    #: The pending segments committed before this one and not reported merged, as
    #: ``(start, length, name)`` (empty if refused).
    pending: tuple[tuple[int, int, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True if the segment was committed."""
        return self.reason is None


def _decide_commit(
    data: dict[str, Any], locked: bool, offset: int, length: int, now: float, expire_after: float
) -> str | None:
    """The refusal of a commit (see :class:`CommitResult`), None to commit; I/O-free.

    The Redis script ``_COMMIT`` makes the same decisions in the same order.
    """
    if locked:
        return "locked"
    if data.get("status", "active") != "active":
        return "complete"
    if int(data.get("offset", 0)) != offset:
        return "offset"
    size = data.get("size")
    if size is not None and offset + length > int(size):
        return "size"
    if float(data.get("activity") or 0.0) + expire_after <= now:
        return "expired"
    return None


@runtime_checkable
class SharedUploadState(Protocol):
    """The shared-state contract of uploads (see the module documentation)."""

    async def lock(self, upload_id: str, owner: str, ttl: float) -> int | None:
        """Take the writer lock for ``ttl`` seconds; the new generation, None if held."""
        ...

    async def extend(self, upload_id: str, owner: str, ttl: float) -> bool:
        """Push the lock's expiry ``ttl`` seconds ahead; False if ``owner`` lost it."""
        ...

    async def unlock(self, upload_id: str, owner: str) -> None:
        """Give the lock back (only if ``owner`` holds it); adds 1 to the generation."""
        ...

    async def get(self, upload_id: str) -> SharedUploadRecord | None:
        """The upload's generation and record; None if the upload is unknown."""
        ...

    async def put(self, upload_id: str, data: dict[str, Any]) -> None:
        """Store the upload's record (the generation does not change)."""
        ...

    async def delete(self, upload_id: str) -> None:
        """Forget the upload (record and generation; a held lock expires by itself)."""
        ...

    async def commit(
        self,
        upload_id: str,
        *,
        offset: int,
        length: int,
        segment: str,
        activity: float,
        now: float,
        expire_after: float,
        merged: Sequence[str] = (),
    ) -> CommitResult:
        """Append a stored segment to the upload if its offset is still ``offset``.

        One atomic compare-and-set (see :class:`CommitResult` for the refusals): the
        record's offset moves from ``offset`` to ``offset + length``, ``activity`` is
        recorded, ``[offset, length, segment]`` joins the record's ``pending`` list
        (segments committed but maybe not yet copied into the upload's file) and the
        ``merged`` segment names leave it; the generation goes up by one.
        """
        ...

    async def close(self) -> None:
        """Release connections (idempotent)."""
        ...


class MemoryUploadState:
    """:class:`SharedUploadState` in this process's memory (one process; tests).

    ``clock`` [``time.monotonic``] decides lock expiry; a test passes its own.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._gen: dict[str, int] = {}
        self._rec: dict[str, str] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    def _holder(self, upload_id: str) -> str | None:
        held = self._locks.get(upload_id)
        if held is None:
            return None
        if held[1] <= self.clock():
            del self._locks[upload_id]
            return None
        return held[0]

    async def lock(self, upload_id: str, owner: str, ttl: float) -> int | None:
        """Take the lock (see :meth:`SharedUploadState.lock`)."""
        if self._holder(upload_id) is not None:
            return None
        self._locks[upload_id] = (owner, self.clock() + ttl)
        self._gen[upload_id] = gen = self._gen.get(upload_id, 0) + 1
        return gen

    async def extend(self, upload_id: str, owner: str, ttl: float) -> bool:
        """Extend the lock (see :meth:`SharedUploadState.extend`)."""
        if self._holder(upload_id) != owner:
            return False
        self._locks[upload_id] = (owner, self.clock() + ttl)
        return True

    async def unlock(self, upload_id: str, owner: str) -> None:
        """Release the lock (see :meth:`SharedUploadState.unlock`)."""
        if self._holder(upload_id) == owner:
            del self._locks[upload_id]
            if upload_id in self._gen:
                self._gen[upload_id] += 1

    async def get(self, upload_id: str) -> SharedUploadRecord | None:
        """The record (see :meth:`SharedUploadState.get`)."""
        gen = self._gen.get(upload_id)
        raw = self._rec.get(upload_id)
        if gen is None and raw is None:
            return None
        return SharedUploadRecord(gen or 0, None if raw is None else json.loads(raw))

    async def put(self, upload_id: str, data: dict[str, Any]) -> None:
        """Store the record (see :meth:`SharedUploadState.put`)."""
        self._rec[upload_id] = json.dumps(data)
        self._gen.setdefault(upload_id, 0)

    async def delete(self, upload_id: str) -> None:
        """Forget the upload (see :meth:`SharedUploadState.delete`)."""
        self._rec.pop(upload_id, None)
        self._gen.pop(upload_id, None)

    async def commit(
        self,
        upload_id: str,
        *,
        offset: int,
        length: int,
        segment: str,
        activity: float,
        now: float,
        expire_after: float,
        merged: Sequence[str] = (),
    ) -> CommitResult:
        """Commit a segment (see :meth:`SharedUploadState.commit`)."""
        raw = self._rec.get(upload_id)
        if raw is None:
            return CommitResult("missing", 0, -1)
        data = json.loads(raw)
        locked = self._holder(upload_id) is not None
        reason = _decide_commit(data, locked, offset, length, now, expire_after)
        previous = self._gen.get(upload_id, 0)
        if reason is not None:
            return CommitResult(reason, int(data.get("offset", 0)), previous)
        done = set(merged)
        prior = [p for p in data.get("pending") or [] if p[2] not in done]
        data.update(
            offset=offset + length, activity=activity, pending=[*prior, [offset, length, segment]]
        )
        self._rec[upload_id] = json.dumps(data)
        self._gen[upload_id] = previous + 1
        return CommitResult(
            None, offset + length, previous, tuple((int(a), int(b), str(c)) for a, b, c in prior)
        )

    async def close(self) -> None:
        """Nothing to release."""


_LOCK = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('HINCRBY', KEYS[1], 'gen', 1)
end
return false
"""
_LOCK_GET = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
  return {gen, redis.call('HGET', KEYS[1], 'rec')}
end
return false
"""
_PUT_UNLOCK = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('HSET', KEYS[1], 'rec', ARGV[4])
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# The decisions of _decide_commit, in its order. cjson keeps the record's other fields
# (an empty list comes back as {}: readers take a falsy value as empty).
_COMMIT = """
local raw = redis.call('HGET', KEYS[1], 'rec')
if not raw then return {'missing', 0, -1, ''} end
local rec = cjson.decode(raw)
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local off = tonumber(rec['offset']) or 0
local offset = tonumber(ARGV[1])
local length = tonumber(ARGV[2])
local reason = false
local status = rec['status']
if status == nil or status == cjson.null then status = 'active' end
local activity = rec['activity']
if activity == nil or activity == cjson.null then activity = 0 end
local size = rec['size']
if redis.call('EXISTS', KEYS[2]) == 1 then reason = 'locked'
elseif status ~= 'active' then reason = 'complete'
elseif off ~= offset then reason = 'offset'
elseif size ~= nil and size ~= cjson.null and offset + length > tonumber(size) then reason = 'size'
elseif tonumber(activity) + tonumber(ARGV[6]) <= tonumber(ARGV[5]) then reason = 'expired'
end
if reason then return {reason, tostring(off), gen, ''} end
local done = {}
for name in string.gmatch(ARGV[7], '%S+') do done[name] = true end
local prior = {}
local pending = rec['pending']
if type(pending) == 'table' then
  for _, p in ipairs(pending) do
    if not done[p[3]] then table.insert(prior, p) end
  end
end
local kept = {}
for i, p in ipairs(prior) do kept[i] = p end
table.insert(kept, {offset, length, ARGV[3]})
rec['offset'] = offset + length
rec['activity'] = tonumber(ARGV[4])
rec['pending'] = kept
redis.call('HSET', KEYS[1], 'rec', cjson.encode(rec))
redis.call('HSET', KEYS[1], 'gen', gen + 1)
local listed = ''
if #prior > 0 then listed = cjson.encode(prior) end
return {'ok', tostring(offset + length), gen, listed}
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'gen', 1)
  end
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 0
"""
#: Seconds between PINGs on the idle release-request listener (a dead Redis connection
#: is noticed within twice that), and the delay before it reconnects.
_LISTEN_PING = 15.0
_LISTEN_RETRY = 1.0


class RedisUploadState:
    """:class:`SharedUploadState` on Redis, for many processes and hosts.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``) or a
    :class:`redis.asyncio.Redis` client (then :meth:`close` leaves it open); ``prefix``
    starts every key (use one per application on a shared Redis). Needs the
    ``redis`` extra (``pip install tornado-longconn[redis]``). Each operation is one
    round trip (a script for lock, extend, unlock and commit; :meth:`lock_and_get` and
    :meth:`put_and_unlock`, which locked writers use, do two operations in one). A tus
    PATCH with a body costs one: its :meth:`commit` before the answer, nothing before
    the body. Each waits at most
    ``connect_timeout`` [2 s] to connect and ``command_timeout`` [5 s] for a reply or
    a free connection (at most ``max_connections`` [64]), and is never retried. Errors
    of the client (``redis.exceptions.ConnectionError``, ``TimeoutError``, ...)
    are raised as :class:`UploadStateUnavailable` (status 503, cause attached): the tus
    handler answers ``503`` with ``Retry-After: retry_after`` [1 s], counts it, and the
    upload is not touched (a lock taken before the error expires after ``lock_ttl``).
    """

    def __init__(
        self,
        redis: str | aioredis.Redis = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "longconn:",
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        max_connections: int = 64,
        retry_after: float = 1.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self.prefix = prefix
        self.retry_after = retry_after
        #: Commands sent to Redis so far (each one round trip; the listener's not counted).
        self.round_trips = 0
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        if isinstance(redis, str):
            if not redis.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(f"not a Redis URL: {redis!r}")
            # Bounded waits; no retries: a lock script retried after a lost reply
            # would find its own lock and answer "held".
            pool = aioredis.BlockingConnectionPool.from_url(
                redis,
                max_connections=max_connections,
                timeout=command_timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=command_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._client = aioredis.Redis.from_pool(pool)
            self._owned = True
        else:
            self._client = redis
            self._owned = False
        self._release_channel = f"{prefix}upload-release".encode()
        self._released_channel = f"{prefix}upload-released".encode()
        self._on_request: Callable[[str], None] | None = None
        self._released: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening: asyncio.Future[None] | None = None
        self._lock = self._client.register_script(_LOCK)
        self._lock_get = self._client.register_script(_LOCK_GET)
        self._put_unlock = self._client.register_script(_PUT_UNLOCK)
        self._extend = self._client.register_script(_EXTEND)
        self._commit = self._client.register_script(_COMMIT)
        self._unlock = self._client.register_script(_UNLOCK)

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        self.round_trips += 1
        try:
            return await awaitable
        except self._errors as exc:
            raise UploadStateUnavailable(
                f"upload state unavailable: {type(exc).__name__}", retry_after=self.retry_after
            ) from exc

    def _keys(self, upload_id: str) -> list[str]:
        key = f"{self.prefix}upload:{upload_id}"
        return [key, key + ":lock"]

    async def lock(self, upload_id: str, owner: str, ttl: float) -> int | None:
        """Take the lock (see :meth:`SharedUploadState.lock`)."""
        result = await self._call(
            self._lock(keys=self._keys(upload_id), args=[owner, max(1, int(ttl * 1000))])
        )
        return None if result is None else int(result)

    async def lock_and_get(
        self, upload_id: str, owner: str, ttl: float
    ) -> tuple[int, SharedUploadRecord] | None:
        """:meth:`lock` and :meth:`get` in one round trip (one script); None if held."""
        result = await self._call(
            self._lock_get(keys=self._keys(upload_id), args=[owner, max(1, int(ttl * 1000))])
        )
        if result is None:
            return None
        gen, raw = int(result[0]), (result[1] if len(result) > 1 else None)
        return gen, SharedUploadRecord(gen, None if raw is None else json.loads(raw))

    async def put_and_unlock(self, upload_id: str, owner: str, data: dict[str, Any]) -> bool:
        """:meth:`put` and :meth:`unlock` in one round trip, only if ``owner`` holds the lock.

        False (nothing stored) if the lock was lost meanwhile.
        """
        keys = self._keys(upload_id)
        args: list[str | bytes] = [owner, self._released_channel, upload_id, json.dumps(data)]
        return bool(await self._call(self._put_unlock(keys=keys, args=args)))

    async def extend(self, upload_id: str, owner: str, ttl: float) -> bool:
        """Extend the lock (see :meth:`SharedUploadState.extend`)."""
        key = self._keys(upload_id)[1]
        return bool(
            await self._call(self._extend(keys=[key], args=[owner, max(1, int(ttl * 1000))]))
        )

    async def unlock(self, upload_id: str, owner: str) -> None:
        """Release the lock (see :meth:`SharedUploadState.unlock`)."""
        await self._call(
            self._unlock(
                keys=self._keys(upload_id), args=[owner, self._released_channel, upload_id]
            )
        )

    async def get(self, upload_id: str) -> SharedUploadRecord | None:
        """The record (see :meth:`SharedUploadState.get`)."""
        gen, raw = await self._call(self._client.hmget(self._keys(upload_id)[0], ["gen", "rec"]))
        if gen is None and raw is None:
            return None
        return SharedUploadRecord(int(gen or 0), None if raw is None else json.loads(raw))

    async def put(self, upload_id: str, data: dict[str, Any]) -> None:
        """Store the record (see :meth:`SharedUploadState.put`)."""
        await self._call(self._client.hset(self._keys(upload_id)[0], "rec", json.dumps(data)))

    async def delete(self, upload_id: str) -> None:
        """Forget the upload (see :meth:`SharedUploadState.delete`)."""
        await self._call(self._client.delete(self._keys(upload_id)[0]))

    async def commit(
        self,
        upload_id: str,
        *,
        offset: int,
        length: int,
        segment: str,
        activity: float,
        now: float,
        expire_after: float,
        merged: Sequence[str] = (),
    ) -> CommitResult:
        """Commit a segment in one script (see :meth:`SharedUploadState.commit`)."""
        args: list[str | int] = [
            offset,
            length,
            segment,
            repr(activity),
            repr(now),
            repr(expire_after),
            " ".join(merged),
        ]
        reply = await self._call(self._commit(keys=self._keys(upload_id), args=args))
        reason = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        listed = reply[3]
        pending: tuple[tuple[int, int, str], ...] = ()
        if listed:
            pending = tuple((int(a), int(b), str(c)) for a, b, c in json.loads(listed))
        return CommitResult(
            None if reason == "ok" else reason, int(reply[1]), int(reply[2]), pending
        )

    # -- release requests (WebSocket takeover across processes) ------------------------

    async def watch_releases(self, on_request: Callable[[str], None]) -> None:
        """Listen for release requests and releases (idempotent; returns once subscribed).

        ``on_request(upload_id)`` is called when another process asks this one's writer
        of ``upload_id`` to let go (:meth:`ask_release`). One pub/sub connection of its
        own, reconnected after errors. Raises :class:`UploadStateUnavailable` if the
        first subscription fails.
        """
        self._on_request = on_request
        if self._listener is None or self._listener.done():
            self._listening = asyncio.get_running_loop().create_future()
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        assert self._listening is not None
        if not self._listening.done():
            await asyncio.shield(self._listening)
        elif self._listening.exception() is not None:
            raise UploadStateUnavailable("upload state unavailable: no release listener")

    def released(self, upload_id: str) -> asyncio.Future[None]:
        """A future set when any process next releases ``upload_id``'s lock.

        Register it before :meth:`ask_release`; drop it with :meth:`forget_released`.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released.setdefault(upload_id, []).append(future)
        return future

    def forget_released(self, upload_id: str, future: asyncio.Future[None]) -> None:
        """Stop waiting with a future of :meth:`released`."""
        waiting = self._released.get(upload_id)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self._released[upload_id]

    async def ask_release(self, upload_id: str) -> None:
        """Ask whichever process writes ``upload_id`` to let go (one PUBLISH)."""
        await self._call(self._client.publish(self._release_channel, upload_id))

    async def _listen(self) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from tornado_longconn._tornado.redispy import pubsub_connection

        while True:
            conn = pubsub_connection(
                self._client.connection_pool,
                protocol=2,
                decode_responses=False,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                await conn.connect()
                await conn.send_command(
                    "SUBSCRIBE", self._release_channel, self._released_channel, check_health=False
                )
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._listening is not None and not self._listening.done():
                    self._listening.set_exception(
                        UploadStateUnavailable(f"upload state unavailable: {exc!r}")
                    )
                    self._listening.exception()
                _log.warning("upload release listener: %r; reconnecting", exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(_LISTEN_RETRY)  # a timer for the reconnect deadline

    async def _read(self, conn: Any) -> None:
        subscribed = 0
        waiting_pong = False
        while True:
            response = await conn.read_response(timeout=_LISTEN_PING, disconnect_on_error=False)
            if response is None:
                if waiting_pong:
                    raise TimeoutError(f"no PONG within {_LISTEN_PING} s")
                await conn.send_command("PING", check_health=False)
                waiting_pong = True
                continue
            waiting_pong = False
            kind = response[0]
            if kind == b"subscribe":
                subscribed += 1
                if subscribed == 2:
                    if self._listening is None or self._listening.done():
                        # (Re)subscribed after a failed first attempt: listening now.
                        self._listening = asyncio.get_running_loop().create_future()
                    self._listening.set_result(None)
            elif kind == b"message":
                upload_id = response[2].decode("ascii", "replace")
                if response[1] == self._release_channel:
                    if self._on_request is not None:
                        self._on_request(upload_id)
                else:
                    for future in self._released.pop(upload_id, []):
                        if not future.done():
                            future.set_result(None)

    async def close(self) -> None:
        """Close the client if this object made it."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        if self._owned:
            self._owned = False
            await self._client.aclose()
