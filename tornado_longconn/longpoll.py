"""Long-polling over a topic's history: :class:`LongPollWaiter` and :class:`LongPollHandler`.

A long-poll request asks "what came after this cursor?" and, when the answer is
"nothing yet", waits until the next message is published or its timeout passes.

:class:`LongPollWaiter` is the shared, per-application object that does the
waiting. It talks to a :class:`~tornado_longconn.backends.base.Backend` through
the Protocol only (``subscribe``/``since``), so it works the same on the
in-memory backend and across processes on Redis. It holds ONE backend
subscription per topic, shared by every waiting request of that topic; one
publish resolves the futures of all requests waiting at the previous cursor
with ONE shared :class:`PollResult`, whose JSON body is encoded once. Requests
that arrive together with the same cursor share one history read
(``backend.since``), and cursors at or just behind the live head are answered
from the last few messages the subscription delivered, without a backend call.

:class:`LongPollHandler` (or :class:`LongPollMixin` in your own handler) answers
``GET <url>?cursor=<cursor>&timeout=<seconds>`` with::

    200 {"messages": [{"cursor": "a1b2c3-7", "data": "hello"},
                      {"cursor": "a1b2c3-8", "data": "AAEC/w==", "binary": true}],
         "cursor": "a1b2c3-8", "gap": false, "reason": null}

* ``messages`` -- every message after ``cursor``, oldest first (at most
  ``max_batch``; poll again at once with the returned cursor for the rest).
  Text messages carry ``data`` as a string; binary messages carry base64 in
  ``data`` and ``"binary": true`` (the key is absent for text).
* ``cursor`` -- where to continue from: send it as ``?cursor=`` next time.
  An empty ``messages`` list means the timeout passed with nothing new.
* ``gap`` -- ``true`` when history no longer reaches back to the cursor
  (evicted, another epoch after a restart, or a cursor from the future).
  Then ``messages`` is empty, ``cursor`` is the topic's current head and
  ``reason`` says why (``"evicted"``, ``"epoch"``, ``"future"``). The client must
  resync (reload its state by other means) and continue from ``cursor``.
  The status is still 200.

No ``cursor`` means "from now on": the request waits for the next message.
``timeout`` defaults to :data:`DEFAULT_TIMEOUT` and is capped at the waiter's
``max_timeout`` (:data:`MAX_TIMEOUT` by default); ``timeout=0`` answers at once.
A malformed cursor or timeout is answered ``400 {"error": "..."}``; a full waiter
(``max_waiters``) or an unreachable backend ``503 {"error": "..."}`` with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import tornado.web

from . import backends
from .connections import ConnectionCounters
from .exceptions import BackendError, CursorError, LongConnError
from .log import Cursor, Message, SinceResult, parse_cursor
from .logfields import log_fields
from .origin import refuse_cross_origin
from .stats import COUNTER, GAUGE

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_WAITERS",
    "DEFAULT_TIMEOUT",
    "MAX_TIMEOUT",
    "LongPollHandler",
    "LongPollMixin",
    "LongPollStats",
    "LongPollWaiter",
    "PollResult",
    "RecentMessages",
    "WaiterLimitError",
    "check_timeout",
    "json_error",
    "message_to_json",
    "topic_for_request",
]

log = logging.getLogger("tornado_longconn.longpoll")

#: Seconds a long-poll waits when the request names no ``timeout``. Below the
#: 30-60 s idle limits of common proxies and load balancers.
DEFAULT_TIMEOUT: Final = 25.0
#: Default cap on a requested timeout (seconds); longer requests are shortened to it.
MAX_TIMEOUT: Final = 60.0
#: Default cap on concurrent :meth:`LongPollWaiter.wait` calls of one waiter.
DEFAULT_MAX_WAITERS: Final = 20_000
#: Default cap on concurrent SSE streams registered with one waiter.
DEFAULT_MAX_STREAMS: Final = 10_000
#: Default cap on messages in one answer; the client polls again for the rest.
DEFAULT_MAX_BATCH: Final = 100
#: Default number of recently received live messages kept per topic to answer
#: slightly-behind cursors without a backend round trip.
DEFAULT_RECENT: Final = 64
#: Default seconds a topic subscription is kept after its last waiter left.
DEFAULT_LINGER: Final = 30.0


class WaiterLimitError(LongConnError):
    """The waiter already serves ``max_waiters`` waits (or ``max_streams`` streams).

    The request is refused instead of queued; the handlers answer 503 with
    ``Retry-After``. The caller retries later.
    """


def check_timeout(timeout: float, maximum: float = MAX_TIMEOUT) -> float:
    """Validate a wait timeout in seconds and cap it at ``maximum``.

    Raises :class:`ValueError` for a negative or NaN timeout; a timeout above
    ``maximum`` (including infinity) becomes ``maximum``.
    """
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    return min(float(timeout), maximum)


def message_to_json(message: Message) -> dict[str, Any]:
    """The JSON form of one message in a long-poll answer.

    ``{"cursor": "<epoch>-<offset>", "data": "<text>"}`` for text;
    ``{"cursor": ..., "data": "<base64>", "binary": true}`` for bytes.
    """
    cursor = str(message.cursor) if message.cursor is not None else None
    if isinstance(message.data, bytes):
        return {
            "cursor": cursor,
            "data": base64.b64encode(message.data).decode("ascii"),
            "binary": True,
        }
    return {"cursor": cursor, "data": message.data}


class PollResult:
    """The answer to one wait: messages after a cursor, or a gap, or nothing.

    ``messages`` are oldest first; ``cursor`` is where to continue from; ``gap``
    and ``reason`` as in :class:`~tornado_longconn.log.SinceResult`. One
    :class:`PollResult` may be shared by thousands of requests woken by the same
    publish; :meth:`to_json` encodes it once.
    """

    __slots__ = ("_body", "_encoded", "cursor", "gap", "messages", "reason")

    def __init__(
        self,
        messages: Sequence[Message],
        cursor: Cursor,
        gap: bool = False,
        reason: str | None = None,
    ) -> None:
        self.messages = messages
        self.cursor = cursor
        self.gap = gap
        self.reason = reason
        self._body: bytes | None = None
        self._encoded: dict[str, bytes] | None = None

    @classmethod
    def from_since(cls, result: SinceResult) -> PollResult:
        """Wrap a backend's :class:`~tornado_longconn.log.SinceResult`."""
        return cls(result.messages, result.cursor, result.gap, result.reason)

    def __repr__(self) -> str:
        return (
            f"<PollResult {len(self.messages)} messages cursor={self.cursor} "
            f"gap={self.gap} reason={self.reason}>"
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"messages": [...], "cursor": "...", "gap": bool, "reason": str|None}``."""
        return {
            "messages": [message_to_json(m) for m in self.messages],
            "cursor": str(self.cursor),
            "gap": self.gap,
            "reason": self.reason,
        }

    def to_json(self) -> bytes:
        """The UTF-8 JSON body of :meth:`to_dict`, encoded once and cached."""
        if self._body is None:
            self._body = json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")
        return self._body

    def encoded(self, key: str, encode: Callable[[PollResult], bytes]) -> bytes:
        """``encode(self)``, computed once per ``key`` and cached (e.g. the SSE form)."""
        cache = self._encoded
        if cache is None:
            cache = self._encoded = {}
        body = cache.get(key)
        if body is None:
            body = cache[key] = encode(self)
        return body


class RecentMessages:
    """The last few live messages of one topic, contiguous by cursor (I/O-free).

    A waiter feeds it every message its subscription delivers. It answers
    :meth:`since` for cursors it can prove it covers, so requests that are at
    (or slightly behind) the live head need no backend round trip:

    * ``[]`` -- ``cursor`` is the newest message seen: nothing newer yet;
    * a list -- the messages after ``cursor`` (at most ``limit``);
    * ``None`` -- unknown here (older, another epoch, ahead): ask the backend.

    A message that does not directly follow the previous one (another epoch, a
    skipped offset) restarts the window, and :meth:`clear` forgets everything
    (the subscription reported a gap). ``size`` 0 keeps only the head.

    >>> recent = RecentMessages(size=2)
    >>> for n in (1, 2, 3):
    ...     recent.append(Message("t", str(n), Cursor("e", n)))
    >>> [m.data for m in recent.since(Cursor("e", 1)) or []]
    ['2', '3']
    >>> recent.since(Cursor("e", 3)), recent.since(Cursor("e", 0))
    ([], None)
    """

    __slots__ = ("_head", "_messages", "size")

    def __init__(self, size: int = DEFAULT_RECENT) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self._messages: deque[Message] = deque(maxlen=size or None)
        self._head: Cursor | None = None

    @property
    def head(self) -> Cursor | None:
        """The cursor of the newest message seen since the last gap, or None."""
        return self._head

    def append(self, message: Message) -> None:
        """Record a live message (one without a cursor is ignored)."""
        cursor = message.cursor
        if cursor is None:
            return
        head = self._head
        if head is None or cursor.epoch != head.epoch or cursor.offset != head.offset + 1:
            self._messages.clear()
        self._head = cursor
        if self.size:
            self._messages.append(message)

    def clear(self) -> None:
        """Forget everything (messages may have been missed)."""
        self._messages.clear()
        self._head = None

    def since(self, cursor: Cursor, limit: int | None = None) -> list[Message] | None:
        """Messages after ``cursor``, ``[]`` when it is the head, None when unknown."""
        head = self._head
        if head is None or cursor.epoch != head.epoch or cursor.offset > head.offset:
            return None
        if cursor.offset == head.offset:
            return []
        msgs = self._messages
        if not msgs:
            return None
        first = msgs[0].cursor.offset  # type: ignore[union-attr]
        if cursor.offset + 1 < first:
            return None
        start = cursor.offset + 1 - first
        stop = len(msgs) if limit is None else min(len(msgs), start + limit)
        return [msgs[i] for i in range(start, stop)]


@dataclass(frozen=True, slots=True)
class LongPollStats:
    """Counters of one :class:`LongPollWaiter` (see :meth:`LongPollWaiter.stats`).

    ``waiting`` waits in progress; ``parked`` those of them registered for the
    next message (the rest are still reading history or subscribing); ``streams`` SSE streams open; ``topics``
    topics with a backend subscription; ``answered`` waits answered with messages
    (``woken`` of them by a live publish, the rest from history); ``reads``
    history reads sent to the backend (concurrent equal reads count once); ``timeouts``
    empty answers; ``gaps`` gap answers; ``rechecks`` wake-ups that had to ask the
    backend again (a gap in the subscription, a message that did not follow the
    waiter's cursor); ``rejected`` waits/streams refused at a limit;
    ``cancelled`` waits cancelled (client gone); ``uncursored`` live messages
    ignored because their topic keeps no history.

    ``waiting``, ``parked``, ``streams`` and ``topics`` are gauges (now); the
    rest are counters (since the waiter was made). SSE streams are counted here
    (``streams``), as :class:`~tornado_longconn.sse.SSEHandler` waits through a
    waiter.
    """

    waiting: int = field(metadata=GAUGE)
    parked: int = field(metadata=GAUGE)
    streams: int = field(metadata=GAUGE)
    topics: int = field(metadata=GAUGE)
    answered: int = field(metadata=COUNTER)
    woken: int = field(metadata=COUNTER)
    reads: int = field(metadata=COUNTER)
    timeouts: int = field(metadata=COUNTER)
    gaps: int = field(metadata=COUNTER)
    rechecks: int = field(metadata=COUNTER)
    rejected: int = field(metadata=COUNTER)
    cancelled: int = field(metadata=COUNTER)
    uncursored: int = field(metadata=COUNTER)


# What a waiting future resolves to.
_TIMEOUT: Final = "timeout"
_RECHECK: Final = "recheck"
_Wake = PollResult | str


class _Topic:
    """One topic's shared subscription: the Subscriber registered with the backend."""

    __slots__ = (
        "__weakref__",
        "inflight",
        "linger",
        "name",
        "owner",
        "ready",
        "recent",
        "seq",
        "users",
        "waiting",
        "warned",
    )

    def __init__(self, owner: LongPollWaiter, name: str, recent: int) -> None:
        self.owner = owner
        self.name = name
        self.recent = RecentMessages(recent)
        # waiters grouped by the cursor they wait after (None: "the next message")
        self.waiting: dict[Cursor | None, dict[asyncio.Future[_Wake], None]] = {}
        self.users = 0
        self.ready: asyncio.Future[None] | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.warned = False
        # bumped by every delivery or gap: tells whether a history read in flight
        # may have missed something a new waiter has not been woken for
        self.seq = 0
        # history reads in flight, shared by waiters asking with the same cursor
        self.inflight: dict[Cursor | None, tuple[int, asyncio.Future[PollResult]]] = {}

    def __repr__(self) -> str:
        return f"<longpoll topic {self.name!r} users={self.users}>"

    def add(self, key: Cursor | None, fut: asyncio.Future[_Wake]) -> None:
        self.waiting.setdefault(key, {})[fut] = None

    def discard(self, key: Cursor | None, fut: asyncio.Future[_Wake]) -> None:
        group = self.waiting.get(key)
        if group is not None:
            group.pop(fut, None)
            if not group:
                del self.waiting[key]

    # Subscriber protocol -------------------------------------------------
    def on_message(self, message: Message) -> None:
        self.seq += 1
        cursor = message.cursor
        if cursor is None:
            self.owner._uncursored += 1
            if not self.warned:
                self.warned = True
                log.warning(
                    "topic %r published a message without history; long-poll and SSE "
                    "clients cannot receive it (publish with history=...)",
                    self.name,
                    extra=log_fields(topic=self.name),
                )
            return
        self.recent.append(message)
        if not self.waiting:
            return
        waiting = self.waiting
        self.waiting = {}
        prev = Cursor(cursor.epoch, cursor.offset - 1) if cursor.offset > 0 else None
        result = PollResult((message,), cursor)
        woken = 0
        for key, group in waiting.items():
            if key is None or key == prev:
                for fut in group:
                    if not fut.done():
                        fut.set_result(result)
                        woken += 1
            else:
                for fut in group:
                    if not fut.done():
                        fut.set_result(_RECHECK)
        self.owner._woken += woken

    def on_gap(self, topic: str, reason: str) -> None:
        self.seq += 1
        log.info(
            "long-poll topic %r: subscription gap (%s); waiters re-read history",
            topic,
            reason,
            extra=log_fields(topic=topic),
        )
        self.recent.clear()
        waiting = self.waiting
        self.waiting = {}
        for group in waiting.values():
            for fut in group:
                if not fut.done():
                    fut.set_result(_RECHECK)


def _forget_read(
    state: _Topic, cursor: Cursor | None, entry: tuple[int, asyncio.Future[PollResult]]
) -> Callable[[asyncio.Future[PollResult]], None]:
    def done(fut: asyncio.Future[PollResult]) -> None:
        if state.inflight.get(cursor) is entry:
            del state.inflight[cursor]
        if not fut.cancelled():
            fut.exception()  # retrieved here: every waiter may have been cancelled

    return done


def _set_timeout(fut: asyncio.Future[_Wake]) -> None:
    if not fut.done():
        fut.set_result(_TIMEOUT)


class LongPollWaiter:
    """Waits for messages after a cursor, sharing one backend subscription per topic.

    Create ONE per application (or per backend) and pass it to every
    :class:`LongPollHandler` and :class:`~tornado_longconn.sse.SSEHandler` through
    ``initialize()`` kwargs. Topics must be published with history (e.g. a
    ``BroadcastGroup`` with ``history=...``): a message without a cursor cannot be
    resumed from; it is counted in ``stats().uncursored`` and logged once.

    Arguments (all keyword except ``backend`` and ``topic``):

    * ``backend`` -- any :class:`~tornado_longconn.backends.base.Backend`.
    * ``topic`` -- the default topic for :meth:`wait` (None: every call names one).
    * ``max_timeout`` (:data:`MAX_TIMEOUT`) -- longer timeouts are shortened to it.
    * ``max_waiters`` (:data:`DEFAULT_MAX_WAITERS`) -- concurrent waits; beyond it
      :meth:`wait` raises :class:`WaiterLimitError` (policy: reject, counted).
    * ``max_streams`` (:data:`DEFAULT_MAX_STREAMS`) -- concurrent SSE streams.
    * ``max_batch`` (:data:`DEFAULT_MAX_BATCH`) -- messages per answer.
    * ``recent`` (:data:`DEFAULT_RECENT`) -- live messages remembered per topic, so
      cursors at or just behind the head are answered without asking the backend.
      Such answers may include messages the backend's history has already
      evicted (never fewer than it holds). 0 remembers only the head cursor.
    * ``linger`` (:data:`DEFAULT_LINGER`) -- seconds a topic stays subscribed after
      its last waiter left, so back-to-back polls do not re-subscribe each time.

    Call :meth:`close` on shutdown: it unsubscribes and answers pending waits.
    """

    def __init__(
        self,
        backend: backends.Backend,
        topic: str | None = None,
        *,
        max_timeout: float = MAX_TIMEOUT,
        max_waiters: int = DEFAULT_MAX_WAITERS,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_batch: int = DEFAULT_MAX_BATCH,
        recent: int = DEFAULT_RECENT,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        if not max_timeout > 0:
            raise ValueError(f"max_timeout must be > 0, got {max_timeout}")
        for name, value in (
            ("max_waiters", max_waiters),
            ("max_streams", max_streams),
            ("max_batch", max_batch),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if recent < 0:
            raise ValueError(f"recent must be >= 0, got {recent}")
        if linger < 0:
            raise ValueError(f"linger must be >= 0, got {linger}")
        self.backend = backend
        self.topic = topic
        self.max_timeout = float(max_timeout)
        self.max_waiters = max_waiters
        self.max_streams = max_streams
        self.max_batch = max_batch
        self.recent = recent
        self.linger = linger
        self._topics: dict[str, _Topic] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False
        self._waiting = 0
        self._streams = 0
        self._answered = 0
        self._woken = 0
        self._reads = 0
        self._timeouts = 0
        self._gaps = 0
        self._rechecks = 0
        self._rejected = 0
        self._cancelled = 0
        self._uncursored = 0

    def __repr__(self) -> str:
        return (
            f"<LongPollWaiter waiting={self._waiting} streams={self._streams} "
            f"topics={len(self._topics)}>"
        )

    @property
    def waiting(self) -> int:
        """Waits in progress right now."""
        return self._waiting

    def stats(self) -> LongPollStats:
        """A snapshot of the counters (see :class:`LongPollStats`)."""
        return LongPollStats(
            waiting=self._waiting,
            parked=sum(len(g) for t in self._topics.values() for g in t.waiting.values()),
            streams=self._streams,
            topics=sum(1 for t in self._topics.values() if t.users or t.linger),
            answered=self._answered,
            woken=self._woken,
            reads=self._reads,
            timeouts=self._timeouts,
            gaps=self._gaps,
            rechecks=self._rechecks,
            rejected=self._rejected,
            cancelled=self._cancelled,
            uncursored=self._uncursored,
        )

    def _topic_name(self, topic: str | None) -> str:
        name = topic if topic is not None else self.topic
        if name is None:
            raise ValueError("no topic: pass topic= to wait() or to LongPollWaiter()")
        return name

    # Subscriptions -------------------------------------------------------
    async def _acquire(self, name: str) -> _Topic:
        state = self._topics.get(name)
        if state is None:
            state = _Topic(self, name, self.recent)
            self._topics[name] = state
            loop = asyncio.get_running_loop()
            state.ready = loop.create_task(self.backend.subscribe(name, state))
            state.ready.add_done_callback(self._subscribed(state))
        if state.linger is not None:
            state.linger.cancel()
            state.linger = None
        state.users += 1
        try:
            assert state.ready is not None
            await asyncio.shield(state.ready)
        except BaseException:
            self._release(state)
            raise
        return state

    def _subscribed(self, state: _Topic) -> Any:
        def done(fut: asyncio.Future[None]) -> None:
            # forget a failed subscription; the next wait tries again
            failed = fut.cancelled() or fut.exception() is not None
            if failed and self._topics.get(state.name) is state:
                del self._topics[state.name]

        return done

    def _release(self, state: _Topic) -> None:
        state.users -= 1
        if state.users or self._topics.get(state.name) is not state:
            return
        if self._closed or self.linger == 0:
            self._unsubscribe(state)
        else:
            loop = asyncio.get_running_loop()
            state.linger = loop.call_later(self.linger, self._expire, state)

    def _expire(self, state: _Topic) -> None:
        state.linger = None
        if state.users == 0 and self._topics.get(state.name) is state:
            self._unsubscribe(state)

    def _unsubscribe(self, state: _Topic) -> None:
        del self._topics[state.name]
        ready = state.ready
        if ready is None or not ready.done() or ready.cancelled() or ready.exception():
            return
        task = asyncio.ensure_future(self.backend.unsubscribe(state.name, state))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "long-poll unsubscribe failed", exc_info=task.exception(), extra=log_fields()
            )

    # Waiting ---------------------------------------------------------------
    async def wait(
        self,
        cursor: str | Cursor | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        topic: str | None = None,
    ) -> PollResult:
        """Messages after ``cursor``; wait up to ``timeout`` seconds when there are none.

        Returns at once when messages after ``cursor`` are kept (at most
        ``max_batch``) or when history no longer reaches back to it (a gap
        answer with the current head, see :class:`PollResult`). Otherwise
        returns when the next message is published (``[message]``) or when
        ``timeout`` passes (no messages, ``cursor`` unchanged). ``cursor`` None
        means "from now on". ``timeout`` 0 never waits; above ``max_timeout``
        it is shortened to it.

        Raises :class:`ValueError` for a negative timeout,
        :class:`~tornado_longconn.exceptions.CursorError` for a malformed cursor,
        :class:`WaiterLimitError` at ``max_waiters``, and the backend's
        :class:`~tornado_longconn.exceptions.BackendError` when it fails.
        Cancelling the call (client gone) removes the wait at once.
        """
        timeout = check_timeout(timeout, self.max_timeout)
        at = parse_cursor(cursor) if cursor is not None else None
        name = self._topic_name(topic)
        if self._closed:
            raise LongConnError("the LongPollWaiter is closed")
        if self._waiting >= self.max_waiters:
            self._rejected += 1
            raise WaiterLimitError(f"{self._waiting} long-poll waits already (max_waiters)")
        self._waiting += 1
        try:
            state = await self._acquire(name)
            try:
                result = await self._wait(state, at, timeout)
            finally:
                self._release(state)
        except asyncio.CancelledError:
            self._cancelled += 1
            raise
        finally:
            self._waiting -= 1
        if result.gap:
            self._gaps += 1
        elif result.messages:
            self._answered += 1
        else:
            self._timeouts += 1
        return result

    async def _wait(self, state: _Topic, cursor: Cursor | None, timeout: float) -> PollResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            local = state.recent.since(cursor, self.max_batch) if cursor is not None else None
            if local:
                return PollResult(local, local[-1].cursor)  # type: ignore[arg-type]
            if local is not None and timeout <= 0:
                return PollResult((), cursor)  # type: ignore[arg-type]
            key = cursor
            fut: asyncio.Future[_Wake] = loop.create_future()
            state.add(key, fut)
            try:
                if local is None:
                    since = await self._since(state, cursor)
                    if since.gap or since.messages or timeout <= 0:
                        return since
                    if key is None:
                        # "from now on": wait after the head we were told
                        state.discard(key, fut)
                        key = cursor = since.cursor
                        if not fut.done():
                            state.add(key, fut)
                if not fut.done():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return PollResult((), cursor)  # type: ignore[arg-type]
                    handle = loop.call_later(remaining, _set_timeout, fut)
                    try:
                        await fut
                    finally:
                        handle.cancel()
                wake = fut.result()
            finally:
                state.discard(key, fut)
                if not fut.done():
                    fut.cancel()
            if isinstance(wake, PollResult):
                return wake
            assert cursor is not None  # set from the backend's head on the first pass
            if wake == _TIMEOUT:
                return PollResult((), cursor)
            self._rechecks += 1
            if deadline - loop.time() <= 0:
                timeout = 0.0

    async def _since(self, state: _Topic, cursor: Cursor | None) -> PollResult:
        """``backend.since`` shared by concurrent waits with the same cursor (single-flight).

        A wait joins a read in flight only if no message or gap was delivered
        since the read was issued: the wait is registered before it asks, so any
        later message wakes it, and the read saw everything before.
        """
        entry = state.inflight.get(cursor)
        if entry is None or entry[0] != state.seq:
            fut = asyncio.ensure_future(self._read(state.name, cursor))
            entry = (state.seq, fut)
            state.inflight[cursor] = entry
            fut.add_done_callback(_forget_read(state, cursor, entry))
        return await asyncio.shield(entry[1])

    async def _read(self, topic: str, cursor: Cursor | None) -> PollResult:
        self._reads += 1
        return PollResult.from_since(await self.backend.since(topic, cursor, limit=self.max_batch))

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Count one open SSE stream for the duration of the ``with`` block.

        Raises :class:`WaiterLimitError` when ``max_streams`` streams are open.
        """
        if self._streams >= self.max_streams:
            self._rejected += 1
            raise WaiterLimitError(f"{self._streams} SSE streams already (max_streams)")
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    async def close(self) -> None:
        """Answer every pending wait (empty), unsubscribe every topic. Idempotent.

        Later :meth:`wait` calls raise
        :class:`~tornado_longconn.exceptions.LongConnError`.
        """
        self._closed = True
        for state in list(self._topics.values()):
            if state.linger is not None:
                state.linger.cancel()
                state.linger = None
            for group in state.waiting.values():
                for fut in group:
                    if not fut.done():
                        fut.set_result(_TIMEOUT)
            if state.users == 0 and self._topics.get(state.name) is state:
                self._unsubscribe(state)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def topic_for_request(
    fixed: str | None, waiter: LongPollWaiter, args: Sequence[str], kwargs: dict[str, str]
) -> str:
    """The topic a handler serves: ``fixed``, else the URL's ``topic`` group, else its
    first group, else the waiter's default topic; ``HTTPError(404)`` when none."""
    topic = fixed or kwargs.get("topic") or (args[0] if args else None) or waiter.topic
    if not topic:
        raise tornado.web.HTTPError(404)
    return topic


def json_error(handler: tornado.web.RequestHandler, status: int, message: str) -> None:
    """Finish ``handler`` with ``status`` and ``{"error": message}`` (503 adds Retry-After)."""
    _error(handler, status, message)


def _error(handler: tornado.web.RequestHandler, status: int, message: str) -> None:
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.set_header("Cache-Control", "no-store")
    if status == 503:
        handler.set_header("Retry-After", "1")
    handler.finish(json.dumps({"error": message}))


class LongPollMixin(tornado.web.RequestHandler):
    """Long-poll answering for your own ``RequestHandler``.

    Set ``self.longpoll_waiter`` (usually in ``initialize``), then in ``get``
    (after your own authentication) ``await self.long_poll(topic)``. It reads
    ``?cursor=`` and ``?timeout=``, waits, and writes the JSON answer described
    in :mod:`tornado_longconn.longpoll`. If you override ``on_connection_close``,
    call ``super().on_connection_close()``: that is what cancels the wait when
    the client goes away.
    """

    longpoll_waiter: LongPollWaiter
    #: Timeout (seconds) when the request has no ``timeout`` argument.
    longpoll_default_timeout: float = DEFAULT_TIMEOUT

    _longpoll_task: asyncio.Future[PollResult] | None = None
    _longpoll_gone = False

    async def long_poll(self, topic: str | None = None) -> None:
        """Answer this request with messages of ``topic`` after ``?cursor=``.

        Writes 200 with the JSON answer, 400 for a malformed ``cursor`` or
        ``timeout``, 503 when the waiter is full or the backend fails; writes
        nothing when the client went away first.
        """
        if refuse_cross_origin(self):
            return
        cursor: Cursor | None = None
        raw_cursor = self.get_query_argument("cursor", None)
        raw_timeout = self.get_query_argument("timeout", None)
        try:
            if raw_cursor:
                cursor = parse_cursor(raw_cursor)
            timeout = self.longpoll_default_timeout
            if raw_timeout is not None:
                try:
                    timeout = float(raw_timeout)
                except ValueError:
                    raise ValueError(
                        f"timeout must be a number, got {raw_timeout[:40]!r}"
                    ) from None
            timeout = check_timeout(timeout, self.longpoll_waiter.max_timeout)
        except (CursorError, ValueError) as exc:
            _error(self, 400, str(exc))
            return
        if self.longpoll_client_gone():
            return
        counters = ConnectionCounters.for_application(self.application)
        counters.opened(self, "longpoll")
        self._longpoll_task = asyncio.ensure_future(
            self.longpoll_waiter.wait(cursor, timeout, topic=topic)
        )
        try:
            result = await self._longpoll_task
        except asyncio.CancelledError:
            if self.longpoll_client_gone():
                return
            raise
        except WaiterLimitError as exc:
            _error(self, 503, str(exc))
            return
        except BackendError as exc:
            log.warning(
                "long-poll on %r failed: %s", topic, exc, extra=log_fields(self, topic=topic)
            )
            _error(self, 503, "backend unavailable")
            return
        finally:
            self._longpoll_task = None
            counters.closed(self)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(result.to_json())

    def longpoll_client_gone(self) -> bool:
        """True once the client closed the connection."""
        return self._longpoll_gone

    def on_connection_close(self) -> None:
        """Cancel the pending wait: the client is gone."""
        self._longpoll_gone = True
        task = self._longpoll_task
        if task is not None:
            task.cancel()
        super().on_connection_close()


class LongPollHandler(LongPollMixin):
    """A ready-made long-poll endpoint: ``GET ?cursor=&timeout=`` (see the module docs).

    ``initialize`` kwargs: ``waiter`` (the shared :class:`LongPollWaiter`) and
    ``topic`` (default: the waiter's topic, else the URL's ``topic`` group or
    first group)::

        waiter = LongPollWaiter(backend)
        app = Application([
            (r"/poll/(?P<topic>[a-z0-9-]+)", LongPollHandler, {"waiter": waiter}),
        ])

    Serving topics named in the URL lets any client read any matching topic:
    restrict the pattern, or subclass and check access in :meth:`get_topic`.
    """

    def initialize(self, waiter: LongPollWaiter, topic: str | None = None) -> None:
        """Store the shared ``waiter`` and the fixed ``topic`` (optional)."""
        self.longpoll_waiter = waiter
        self.longpoll_topic = topic

    def get_topic(self, *args: str, **kwargs: str) -> str:
        """The topic to serve; raises ``HTTPError(404)`` when there is none."""
        return topic_for_request(self.longpoll_topic, self.longpoll_waiter, args, kwargs)

    async def get(self, *args: str, **kwargs: str) -> None:
        """Answer the long-poll (see :meth:`LongPollMixin.long_poll`)."""
        await self.long_poll(self.get_topic(*args, **kwargs))
