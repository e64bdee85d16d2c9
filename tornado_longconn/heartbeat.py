"""Heartbeats for WebSocket handlers: keepalive, dead-peer detection, round-trip latency.

Mix :class:`HeartbeatMixin` into a :class:`tornado.websocket.WebSocketHandler`::

    class Chat(HeartbeatMixin, tornado.websocket.WebSocketHandler):
        heartbeat_interval = 20.0      # seconds between pings; None turns heartbeats off
        heartbeat_timeout = 20.0       # extra time a silent peer gets before it is dropped

        def on_message(self, message): ...

The connection is *alive* while anything moves: any inbound frame (message,
pong, ping), dated when it arrives, or the peer making room for bytes that were
waiting to be sent to it, dated at the scheduler's check that sees it (checks
run at least once per interval). A peer that sends nothing and drains nothing
for ``interval + timeout`` seconds is *dead*: it is dropped within one
scheduler step (:data:`DEFAULT_RESOLUTION`, or :data:`COALESCE_FRACTION` of the
interval when that is longer) of that bound, its TCP connection
aborted (no close handshake with a peer that is gone), and ``on_close`` runs
once, as for any other close. Bytes the kernel takes at once are not activity:
a dead peer's kernel buffer takes them too (until it is full).

Pieces:

* :class:`HeartbeatConfig` -- validated settings (class attributes, overridden by
  application settings of the same name).
* :class:`HeartbeatState` -- the I/O-free decision logic: "ping now?", "is this
  peer dead?", given ``now``.
* :class:`HeartbeatScheduler` -- ONE timer wheel per event loop shared by every
  connection, with jitter (process-level GC tuning: :mod:`tornado_longconn.gc_tuning`).
* :class:`HeartbeatCounters` -- application-wide live counters and latency
  samples, found in ``application.settings["heartbeat_counters"]``;
  :func:`heartbeat_stats` returns their :class:`HeartbeatStats` snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import logging
import math
import random
import struct
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import tornado.web
import tornado.websocket
from tornado.iostream import IOStream
from typing_extensions import override

from ._frames import (
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    abort_stream,
    build_frame,
    try_send,
)
from ._tornado.iostream import release_error, write_done, write_total
from ._tornado.websocket_proto import read_progress
from .codes import CloseCode
from .connections import _find_slots, _slots_of
from .gc_tuning import _tuning_active, tune_gc
from .gc_tuning import after_tick as gc_after_tick
from .histogram import HistogramStats, LatencyHistogram
from .logfields import log_fields
from .stats import COUNTER, GAUGE, PEAK
from .strict import StrictWebSocketMixin

__all__ = [
    "COALESCE_FRACTION",
    "DEFAULT_INTERVAL",
    "DEFAULT_MESSAGE",
    "DEFAULT_REPLY",
    "DEFAULT_RESOLUTION",
    "PING_PAYLOAD",
    "HeartbeatAction",
    "HeartbeatConfig",
    "HeartbeatCounters",
    "HeartbeatMixin",
    "HeartbeatScheduler",
    "HeartbeatState",
    "HeartbeatStats",
    "heartbeat_stats",
]

#: The application setting that holds the :class:`HeartbeatCounters`.
_SETTING: Final = "heartbeat_counters"

#: Default seconds between heartbeats (``heartbeat_interval``).
DEFAULT_INTERVAL: Final = 20.0
#: Default application-level heartbeat sent in ``"application"`` mode.
DEFAULT_MESSAGE: Final = '{"type":"ping"}'
#: Default application-level reply recognised in ``"application"`` mode.
DEFAULT_REPLY: Final = '{"type":"pong"}'
#: Default scheduler tick (seconds): deadlines are rounded UP to a multiple of it.
DEFAULT_RESOLUTION: Final = 0.05
#: A connection's deadline may be rounded up by this fraction of its interval
#: (in whole ticks; never less than one tick): see :class:`HeartbeatScheduler`.
COALESCE_FRACTION: Final = 0.01
#: Payload of the protocol pings this module sends; a pong echoing it is an answer.
PING_PAYLOAD: Final = b"lc-hb"

_PING_FRAME: Final = build_frame(OP_PING, PING_PAYLOAD)
_TIMEOUT_CLOSE_FRAME: Final = build_frame(
    OP_CLOSE, struct.pack("!H", CloseCode.HEARTBEAT_TIMEOUT) + b"heartbeat timeout"
)
_MODES: Final = ("protocol", "application")
_log = logging.getLogger("tornado_longconn.heartbeat")
_UNSET: Final[Any] = object()


def _check_seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds or None, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0 seconds (or None), got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    """Validated heartbeat settings of one handler class (or one connection).

    Arguments (all keyword, all optional):

    * ``interval`` -- seconds between pings (default :data:`DEFAULT_INTERVAL`);
      ``None`` turns heartbeats off (nothing is sent, nothing is closed).
    * ``timeout`` -- how long a silent peer may stay silent AFTER the interval
      before it is declared dead; ``None`` (default) means "same as interval".
      A peer is dropped when it showed no activity for ``interval + timeout``.
    * ``mode`` -- ``"protocol"`` (RFC 6455 ping/pong frames, default) or
      ``"application"`` (a text ``message`` and a text ``reply``, for clients
      whose code cannot see ping frames).
    * ``message`` -- the application-level heartbeat: ``str``, or ``dict``/``list``
      sent as compact JSON (default :data:`DEFAULT_MESSAGE`).
    * ``reply`` -- the reply that answers it (default :data:`DEFAULT_REPLY`); a
      ``dict``/``list`` is compared in its compact JSON form.

    Raises ``ValueError`` with the offending name and value for a negative, zero
    or non-numeric interval/timeout, a timeout without an interval, an unknown
    mode, or an empty message/reply.
    """

    interval: float | None = DEFAULT_INTERVAL
    timeout: float | None = None
    mode: str = "protocol"
    message: Any = DEFAULT_MESSAGE
    reply: Any = DEFAULT_REPLY

    def __post_init__(self) -> None:
        interval = _check_seconds("heartbeat_interval", self.interval)
        timeout = _check_seconds("heartbeat_timeout", self.timeout)
        if interval is None and timeout is not None:
            raise ValueError(
                f"heartbeat_timeout={timeout!r} is set but heartbeat_interval is None: "
                "a timeout needs an interval (set heartbeat_interval, or drop the timeout)"
            )
        if self.mode not in _MODES:
            raise ValueError(
                f"heartbeat_mode must be 'protocol' or 'application', not {self.mode!r}"
            )
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "message", _as_text("heartbeat_message", self.message))
        object.__setattr__(self, "reply", _as_text("heartbeat_reply", self.reply))

    @property
    def effective_timeout(self) -> float | None:
        """The timeout in use: ``timeout``, or ``interval`` when it is unset."""
        return self.timeout if self.timeout is not None else self.interval

    @classmethod
    def for_handler(cls, handler: tornado.web.RequestHandler) -> HeartbeatConfig:
        """Resolve a handler's configuration.

        Class attributes ``heartbeat_interval``, ``heartbeat_timeout``,
        ``heartbeat_mode``, ``heartbeat_message`` and ``heartbeat_reply`` give the
        defaults; application settings with the same names override them (a
        setting present with value ``None`` counts: ``heartbeat_interval=None`` in
        the settings turns heartbeats off whatever timeout the class declares).
        Raises ``ValueError`` as the constructor does.
        """
        return cls._resolve(type(handler), handler.settings)

    @classmethod
    def _resolve(cls, klass: type, settings: dict[str, Any]) -> HeartbeatConfig:
        values: dict[str, Any] = {}
        from_settings: set[str] = set()
        for name in ("interval", "timeout", "mode", "message", "reply"):
            key = "heartbeat_" + name
            value = settings.get(key, _UNSET)
            if value is _UNSET:
                value = getattr(klass, key, _UNSET)
            else:
                from_settings.add(name)
            if value is not _UNSET:
                values[name] = value
        if (
            "interval" in from_settings
            and values["interval"] is None
            and "timeout" not in from_settings
        ):
            # heartbeat_interval=None in the settings turns off every handler,
            # whatever timeout its class declares.
            values.pop("timeout", None)
        return cls(**values)


def _as_text(name: str, value: object) -> str:
    if isinstance(value, (dict, list)):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str (or a dict/list for JSON), not {value!r}")
    return value


class HeartbeatAction(IntEnum):
    """What :meth:`HeartbeatState.next_action` tells the caller to do."""

    #: Nothing to do until :attr:`HeartbeatState.deadline`.
    WAIT = 0
    #: Send a heartbeat now.
    PING = 1
    #: The peer is dead: abort the connection.
    CLOSE = 2


_WAIT: Final = HeartbeatAction.WAIT
_PING: Final = HeartbeatAction.PING
_CLOSE: Final = HeartbeatAction.CLOSE


class HeartbeatState:
    """Liveness bookkeeping of ONE connection (I/O-free; every method takes ``now``).

    ``interval`` and ``timeout`` are seconds (both > 0); ``now`` is the creation
    time, counted as activity. ``first_ping`` is when the first heartbeat is due
    (default ``now + interval``; the scheduler passes a jittered time no later
    than that).

    The rules:

    * a heartbeat is due every ``interval`` seconds (:attr:`next_ping`), counted
      from when the last one was due, not from when a late check sent it (more
      than an interval late, from the send);
    * any activity -- :meth:`activity`, :meth:`answer`, or a changed ``progress``
      value passed to :meth:`next_action` -- moves :attr:`last_activity` to ``now``;
    * the peer is dead once ``now >= last_activity + interval + timeout``;
      never earlier.

    Call :meth:`next_action` at or after :attr:`deadline` and do what it says.

    >>> s = HeartbeatState(interval=10, timeout=5, now=0.0)
    >>> s.deadline, s.next_action(10.0)
    (10.0, <HeartbeatAction.PING: 1>)
    >>> s.answer(10.25)                        # the pong, 0.25 s later
    0.25
    >>> s.next_action(20.0), s.deadline       # next ping; dead at 10.25 + 15
    (<HeartbeatAction.PING: 1>, 25.25)
    >>> s.next_action(25.2), s.next_action(25.25)
    (<HeartbeatAction.WAIT: 0>, <HeartbeatAction.CLOSE: 2>)
    """

    __slots__ = (
        "_slot",
        "counters",
        "frame",
        "interval",
        "last_activity",
        "latency",
        "next_ping",
        "ping_sent_at",
        "progress",
        "timed_out",
        "timeout",
        "write_done",
        "write_total",
    )

    def __init__(
        self,
        interval: float,
        timeout: float,
        now: float,
        *,
        first_ping: float | None = None,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError(f"interval and timeout must be > 0, got {interval!r}, {timeout!r}")
        self.interval = interval
        self.timeout = timeout
        self.last_activity = now
        self.next_ping = now + interval if first_ping is None else min(first_ping, now + interval)
        #: When the outstanding heartbeat was sent (None: nothing outstanding).
        self.ping_sent_at: float | None = None
        #: The last progress value seen by :meth:`next_action` (opaque to this class).
        self.progress: object = None
        #: Last round-trip time in seconds; None before the first answer.
        self.latency: float | None = None
        #: True once :meth:`next_action` returned ``CLOSE``.
        self.timed_out = False
        #: Write counters at the last :meth:`writes` sample (bytes accepted, bytes sent).
        self.write_total = 0
        self.write_done = 0
        # Slots for the shell (the mixin and the scheduler), unused here.
        self.frame = b""
        self.counters: HeartbeatCounters | None = None
        self._slot: int | None = None

    @property
    def dead_at(self) -> float:
        """The time from which the peer counts as dead, unless activity comes first."""
        return self.last_activity + self.interval + self.timeout

    @property
    def deadline(self) -> float:
        """When :meth:`next_action` has something to do: the next ping or ``dead_at``."""
        dead_at = self.last_activity + self.interval + self.timeout
        return self.next_ping if self.next_ping < dead_at else dead_at

    def activity(self, now: float, progress: object = None) -> None:
        """Record activity from the peer (any frame in, or room made for waiting bytes) at ``now``.

        ``progress`` is the shell's I/O counter sampled at ``now`` (see
        :meth:`next_action`); passing it dates the bytes of this activity at
        ``now``, so the next check does not count them again, later. Without
        it, the bytes that carried this activity are seen as new progress at
        the next check, which then moves :attr:`last_activity` to that check's
        time and detection is up to one interval late.
        """
        if now > self.last_activity:
            self.last_activity = now
        if progress is not None:
            self.progress = progress

    def answer(self, now: float, progress: object = None) -> float | None:
        """Record the answer to a heartbeat; return its round-trip time (or None).

        ``progress`` as for :meth:`activity`. An answer with no heartbeat
        outstanding (a duplicate or unsolicited one) still counts as activity
        and returns None.

        >>> s = HeartbeatState(interval=2, timeout=1, now=0.0)
        >>> s.next_action(0.5, progress=10), s.next_action(2.0, progress=10)
        (<HeartbeatAction.WAIT: 0>, <HeartbeatAction.PING: 1>)
        >>> s.answer(2.25, progress=30)           # the pong's bytes, dated now
        0.25
        >>> s.next_action(4.0, progress=30), s.dead_at   # nothing new since the pong
        (<HeartbeatAction.PING: 1>, 5.25)
        """
        self.activity(now, progress)
        sent = self.ping_sent_at
        if sent is None:
            return None
        self.ping_sent_at = None
        rtt = now - sent if now > sent else 0.0
        self.latency = rtt
        return rtt

    def writes(self, now: float, total: int, done: int) -> None:
        """Sample the write counters at ``now``: ``total`` bytes accepted, ``done`` sent.

        Bytes sent since the last sample are activity when bytes were waiting,
        at the last sample or now: the peer is reading what we stream to it.
        Bytes that went out at once with nothing left waiting prove nothing (a
        dead peer's kernel buffer takes them too), so they are not activity.

        >>> s = HeartbeatState(interval=1, timeout=1, now=0.0)
        >>> s.writes(0.5, total=100, done=100)    # sent at once: not the peer
        >>> s.last_activity
        0.0
        >>> s.writes(0.8, total=900, done=300)    # 600 bytes left waiting
        >>> s.writes(1.5, total=900, done=500)    # the peer made room for 200
        >>> s.last_activity
        1.5
        """
        write_done = self.write_done
        if done > write_done and (write_done < self.write_total or done < total):
            self.activity(now)
        self.write_total = total
        self.write_done = done

    def next_action(self, now: float, progress: object = None) -> HeartbeatAction:
        """Decide what to do at ``now``: ``WAIT``, ``PING`` (send one) or ``CLOSE``.

        ``progress`` is any value that changes whenever the peer sends bytes
        (the shell passes its read counters); a change since the last call
        counts as activity at ``now``. ``None`` means "not sampled".
        A ``PING`` answer records the heartbeat as sent at ``now``.
        """
        if progress is not None and progress != self.progress:
            if self.progress is not None:
                self.activity(now)
            self.progress = progress
        if now >= self.last_activity + self.interval + self.timeout:
            self.timed_out = True
            return _CLOSE
        if now >= self.next_ping:
            # The peer may answer only the latest ping (RFC 6455 5.5.3): time that one.
            self.ping_sent_at = now
            # One interval after this ping was DUE, not after it went: a late check
            # (a busy loop) neither pushes every later ping back nor lets the
            # connections of several late buckets fall into one bucket from then on.
            due = self.next_ping + self.interval
            self.next_ping = due if due > now else now + self.interval
            return _PING
        return _WAIT


@dataclass(frozen=True, slots=True)
class HeartbeatStats:
    """A snapshot of an application's heartbeat counters (see :func:`heartbeat_stats`).

    ``p50`` / ``p99`` cover the most recent samples kept by the
    :class:`HeartbeatCounters` (``None`` before the first answer); summed with
    :func:`~tornado_longconn.stats.sum_stats` they take the maximum, an upper
    bound of the pooled percentile.
    """

    #: Connections watched now (gauge).
    connections: int = field(default=0, metadata=GAUGE)
    #: Heartbeats sent: pings or application-level messages (counter).
    pings_sent: int = field(default=0, metadata=COUNTER)
    #: Connections aborted because their peer was silent past the timeout (counter).
    timeouts: int = field(default=0, metadata=COUNTER)
    #: Round-trip samples recorded, also those no longer kept (counter).
    count: int = field(default=0, metadata=COUNTER)
    #: Median round-trip time in seconds (peak; None before the first answer).
    p50: float | None = field(default=None, metadata=PEAK)
    #: 99th-percentile round-trip time in seconds (peak; None before the first answer).
    p99: float | None = field(default=None, metadata=PEAK)


class HeartbeatCounters:
    """An application's live heartbeat counters and round-trip samples.

    One per application, at ``application.settings["heartbeat_counters"]``
    (created on first use; put your own there to choose ``max_samples``). The
    heartbeat shell updates them; read them with :meth:`stats` (or
    :func:`heartbeat_stats`). Percentiles cover the most recent
    ``max_samples`` answers (default 1024); older samples are dropped, so
    memory is bounded. Raises ``ValueError`` for ``max_samples < 1``.

    >>> counters = HeartbeatCounters()
    >>> for rtt in (0.010, 0.020, 0.030):
    ...     counters.record_latency(rtt)
    >>> counters.stats().count, counters.stats().p50
    (3, 0.02)
    """

    __slots__ = ("_latency", "_samples", "connections", "count", "pings_sent", "timeouts")

    def __init__(self, *, max_samples: int = 1024) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self._samples: deque[float] = deque(maxlen=max_samples)
        # Every sample since start, in fixed buckets (one increment per answer).
        self._latency = LatencyHistogram()
        #: Round-trip samples recorded since start (also those no longer kept).
        self.count = 0
        #: Heartbeats sent (pings or application-level messages).
        self.pings_sent = 0
        #: Connections aborted because their peer was silent past the timeout.
        self.timeouts = 0
        #: Connections currently watched.
        self.connections = 0

    @classmethod
    def for_application(cls, application: tornado.web.Application) -> HeartbeatCounters:
        """The application's counters (``settings["heartbeat_counters"]``), created if missing.

        Raises :class:`TypeError` if that setting holds something else.
        """
        counters = application.settings.get(_SETTING)
        if counters is None:
            counters = application.settings[_SETTING] = cls()
        if not isinstance(counters, HeartbeatCounters):
            raise TypeError(f"settings[{_SETTING!r}] must be a HeartbeatCounters, not {counters!r}")
        return counters

    def record_latency(self, seconds: float) -> None:
        """Add one round-trip sample (seconds)."""
        self.count += 1
        self._samples.append(seconds)
        self._latency.observe(seconds)

    def latency_histogram(self) -> HistogramStats:
        """Every round-trip sample since start, in fixed buckets (:class:`HistogramStats`).

        Unlike ``p50``/``p99`` (the most recent ``max_samples`` only), it covers
        all answers: :mod:`tornado_longconn.metrics` exports it as a histogram.
        """
        return self._latency.stats()

    def percentile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1, nearest rank) of the kept samples; None without any."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be within 0..1, got {q!r}")
        return _nearest_rank(sorted(self._samples), q)

    def stats(self) -> HeartbeatStats:
        """A snapshot of the counters with p50 and p99 of the kept samples (:class:`HeartbeatStats`)."""
        ordered = sorted(self._samples)
        return HeartbeatStats(
            connections=self.connections,
            pings_sent=self.pings_sent,
            timeouts=self.timeouts,
            count=self.count,
            p50=_nearest_rank(ordered, 0.5),
            p99=_nearest_rank(ordered, 0.99),
        )


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def heartbeat_stats(application: tornado.web.Application) -> HeartbeatStats:
    """A snapshot of ``application``'s heartbeat counters (see :class:`HeartbeatCounters`).

    Raises :class:`TypeError` if ``settings["heartbeat_counters"]`` holds
    something other than a :class:`HeartbeatCounters`.
    """
    return HeartbeatCounters.for_application(application).stats()


def _send(stream: IOStream, frame: bytes) -> bool:
    """Queue ``frame`` after anything already pending on ``stream`` (never raises).

    True when some of it waits in the stream (the kernel did not take it all).
    """
    try:
        sent = try_send(stream, frame)
        if sent < len(frame):
            # The write Future is not kept: IOStream marks its exception as
            # retrieved when the stream closes, so nothing is logged.
            stream.write(frame[sent:] if sent else frame)
            return True
    except Exception as exc:  # OSError, StreamClosedError: the peer is gone
        stream.close(exc_info=exc)
    return False


_SCHEDULERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HeartbeatScheduler] = (
    weakref.WeakKeyDictionary()
)


class HeartbeatScheduler:
    """One timer wheel per event loop, shared by every heartbeat connection on it.

    Each connection sits in exactly one bucket: its next deadline rounded UP to a
    multiple of its *step*, which is ``resolution`` seconds (default
    :data:`DEFAULT_RESOLUTION`) times the whole number of ticks in
    :data:`COALESCE_FRACTION` of its interval, at least one. With the default
    tick: 0.05 s for intervals below 10 s, 0.1 s at 10 s, 0.2 s at the default
    20 s, 0.25 s at 25 s.
    One ``loop.call_at`` timer fires per non-empty bucket and handles all of its
    connections in one pass, so 10,000 connections cost a few wakeups per second,
    not 10,000 tasks; a longer interval means fewer, fuller buckets (each wakeup of
    an idle process costs far more than one connection's check). First pings are
    jittered uniformly over one interval, so connections opened together do not
    ping together.

    Get the loop's scheduler with :meth:`current`; the mixin does this for you.
    Nothing happens before its time: a ping is sent, and a connection detected
    dead, at most one step late (``interval + timeout`` of silence, plus up to
    1% of the interval or one tick, whichever is more).

    GC tuning is a process-level choice made once at start-up
    (:func:`tornado_longconn.tune_gc`); it runs after each tick.
    """

    def __init__(self, *, resolution: float = DEFAULT_RESOLUTION) -> None:
        if not resolution > 0:
            raise ValueError(f"resolution must be > 0 seconds, got {resolution!r}")
        self.resolution = resolution
        # Slot key -> the connections due in it, each with its state.
        self._buckets: dict[int, dict[HeartbeatMixin, HeartbeatState]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_key: int | None = None
        self._count = 0
        self._random = random.Random()

    @classmethod
    def current(cls) -> HeartbeatScheduler:
        """The scheduler of the running event loop (created on first use).

        Must be called from within the loop. Schedulers are kept per loop in a
        weak mapping: a closed, unreferenced loop takes its scheduler with it.
        """
        loop = asyncio.get_running_loop()
        scheduler = _SCHEDULERS.get(loop)
        if scheduler is None:
            scheduler = _SCHEDULERS[loop] = cls()
        return scheduler

    def __len__(self) -> int:
        """Number of connections watched."""
        return self._count

    def add(self, handler: HeartbeatMixin, state: HeartbeatState, now: float) -> None:
        """Start watching ``handler`` (whose ``_heartbeat`` is ``state``), jittering its first ping."""
        state.next_ping = now + self._random.random() * state.interval
        self._count += 1
        self._schedule(handler, state)

    def discard(self, handler: HeartbeatMixin, state: HeartbeatState) -> None:
        """Stop watching ``handler``; a no-op when it is not watched."""
        slot = state._slot
        if slot is None:
            return
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.pop(handler, None)
        self._forget(state)

    def _forget(self, state: HeartbeatState) -> None:
        state._slot = None
        if state.counters is not None:
            state.counters.connections -= 1
        self._count -= 1
        if self._count == 0:
            self._idle()

    def _idle(self) -> None:
        # Nothing watched: drop the timer (it references the loop) and the buckets.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_key = None
        self._buckets.clear()
        self._heap.clear()

    def bucket_key(self, state: HeartbeatState) -> int:
        """The bucket of ``state``'s next deadline, in ticks: never before it, at most one step after.

        The step is :attr:`resolution` times the whole ticks in
        :data:`COALESCE_FRACTION` of the state's interval (at least one tick).
        """
        deadline = state.last_activity + state.interval + state.timeout  # state.deadline
        if state.next_ping < deadline:
            deadline = state.next_ping
        resolution = self.resolution
        key = math.ceil(deadline / resolution)
        if key * resolution < deadline:  # float rounding: never fire before the deadline
            key += 1
        step = int(state.interval * COALESCE_FRACTION / resolution + 1e-9)
        if step > 1:  # up to the next multiple of the step: fewer, fuller buckets
            key = -(-key // step) * step
        return key

    def _schedule(self, handler: HeartbeatMixin, state: HeartbeatState) -> None:
        key = state._slot = self.bucket_key(state)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._heap, key)
            if self._timer_key is None or key < self._timer_key:
                self._arm(key)
        bucket[handler] = state

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_key = key
        self._timer = asyncio.get_running_loop().call_at(key * self.resolution, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        fired = self._timer_key
        self._timer = None
        self._timer_key = None
        now = loop.time()
        heap = self._heap
        buckets = self._buckets
        resolution = self.resolution
        while heap and (heap[0] == fired or heap[0] * resolution <= now):
            key = heapq.heappop(heap)
            bucket = buckets.pop(key, None)
            if not bucket:
                continue
            # A timer may fire a hair early: never judge a bucket before its time.
            at = max(now, key * resolution)
            for handler, state in bucket.items():
                try:
                    self._check(handler, state, at)
                except Exception:  # one broken connection must not stop the others
                    _log.exception(
                        "heartbeat check failed; connection no longer watched",
                        extra=log_fields(handler),
                    )
                    self.discard(handler, state)
        if heap:
            self._arm(heap[0])
        gc_after_tick()

    def _check(self, handler: HeartbeatMixin, state: HeartbeatState, now: float) -> None:
        if state._slot is None:
            return
        ws = handler.ws_connection
        stream = None if ws is None else ws.stream
        if stream is None or stream.closed():
            # Closed, or the handshake never completed: stop watching.
            self._forget(state)
            return
        state.writes(now, write_total(stream), write_done(stream))
        action = state.next_action(now, read_progress(ws, stream))
        if action is _PING:
            if not ws.is_closing():  # type: ignore[union-attr]
                if _send(stream, state.frame):
                    # Our own heartbeat is not the peer's progress; what of it
                    # waits in the stream is, once the peer makes room for it.
                    state.writes(now, write_total(stream), write_done(stream))
                if state.counters is not None:
                    state.counters.pings_sent += 1
        elif action is _CLOSE:
            self._forget(state)
            handler._heartbeat_expire(stream)
            return
        self._schedule(handler, state)


def _intercept_on_message(
    func: Callable[[Any, str | bytes], Awaitable[None] | None],
) -> Callable[[Any, str | bytes], Awaitable[None] | None]:
    @functools.wraps(func)
    def on_message(self: HeartbeatMixin, message: str | bytes) -> Awaitable[None] | None:
        state = self._heartbeat
        if (
            state is not None
            and state.frame is not _PING_FRAME
            and isinstance(message, str)
            and self.is_heartbeat_reply(message)
        ):
            self._heartbeat_answer(state)
            return None
        if state is not None:
            self._heartbeat_seen(state)
        return func(self, message)

    on_message._heartbeat_wrapped = True  # type: ignore[attr-defined]
    return on_message


def _intercept_on_pong(func: Callable[[Any, bytes], Any]) -> Callable[[Any, bytes], Any]:
    @functools.wraps(func)
    def on_pong(self: HeartbeatMixin, data: bytes) -> Any:
        state = self._heartbeat
        if state is not None:
            if data == PING_PAYLOAD and state.frame is _PING_FRAME:
                self._heartbeat_answer(state)
            else:
                self._heartbeat_seen(state)
        return func(self, data)

    on_pong._heartbeat_wrapped = True  # type: ignore[attr-defined]
    return on_pong


def _intercept_on_ping(func: Callable[[Any, bytes], Any]) -> Callable[[Any, bytes], Any]:
    @functools.wraps(func)
    def on_ping(self: HeartbeatMixin, data: bytes) -> Any:
        state = self._heartbeat
        if state is not None:
            self._heartbeat_seen(state)
        return func(self, data)

    on_ping._heartbeat_wrapped = True  # type: ignore[attr-defined]
    return on_ping


class HeartbeatMixin(StrictWebSocketMixin):
    """Keepalive, dead-peer detection and round-trip latency for a WebSocket handler.

    Put it BEFORE ``WebSocketHandler`` in the bases (and before
    :class:`~tornado_longconn.strict.StrictWebSocketMixin`, which it already
    includes: every heartbeat handler answers RFC 6455 violations with a close
    frame, see :doc:`/topics/security`). Configure it with class
    attributes; application settings with the same names override them:

    * ``heartbeat_interval`` (default 20.0 s; ``None`` turns heartbeats off),
    * ``heartbeat_timeout`` (default ``None`` = same as the interval),
    * ``heartbeat_mode`` -- ``"protocol"`` (ping/pong frames, default) or
      ``"application"`` (``heartbeat_message`` out, ``heartbeat_reply`` back),
    * ``heartbeat_message`` / ``heartbeat_reply`` (defaults
      ``'{"type":"ping"}'`` / ``'{"type":"pong"}'``); override
      :meth:`is_heartbeat_reply` for looser matching.

    Bad class attributes raise ``ValueError`` when the class is defined; bad
    settings raise it when a connection is opened (Tornado answers 500).

    You call nothing: your ``open``, ``on_message``, ``on_pong`` and ``on_close``
    run as usual (the mixin wraps ``on_message``/``on_pong`` of subclasses to see
    heartbeat answers first; application-level replies are NOT passed to your
    ``on_message``). If you override ``on_connection_close`` or
    ``get_websocket_protocol``, call ``super()``.

    When the peer stays silent for ``interval + timeout`` (no frame in, no
    progress in sending it what waits for it), the connection is dropped without a close handshake: if our writes
    to it are stuck it is reset (``SO_LINGER`` 0, freeing the kernel's buffers);
    otherwise a close frame with
    :attr:`~tornado_longconn.codes.CloseCode.HEARTBEAT_TIMEOUT` is handed to the
    kernel if it takes it at once, and the socket is closed. ``on_close`` runs
    once, with :attr:`heartbeat_timed_out` True.

    Tornado's own ``websocket_ping_interval`` setting is ignored for handlers
    with heartbeats on (a ``RuntimeWarning`` says so once); with
    ``heartbeat_interval = None`` Tornado's pinging works as before.
    """

    #: Seconds between heartbeats; ``None`` turns them off.
    heartbeat_interval: float | None = DEFAULT_INTERVAL
    #: Extra seconds a silent peer gets after the interval; ``None``: the interval.
    heartbeat_timeout: float | None = None
    #: ``"protocol"`` (ping/pong frames) or ``"application"`` (text messages).
    heartbeat_mode: str = "protocol"
    #: The application-level heartbeat (``str``, or ``dict``/``list`` sent as JSON).
    heartbeat_message: Any = DEFAULT_MESSAGE
    #: The application-level reply that answers it.
    heartbeat_reply: Any = DEFAULT_REPLY

    _heartbeat_reply_text: str = DEFAULT_REPLY

    @property
    def _heartbeat(self) -> HeartbeatState | None:
        # Kept in the handler's one library attribute (connections._Slots): one
        # instance attribute more would give every handler a dict of its own.
        slots = _find_slots(self)
        return None if slots is None else slots.heartbeat

    @_heartbeat.setter
    def _heartbeat(self, state: HeartbeatState | None) -> None:
        _slots_of(self).heartbeat = state

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        HeartbeatConfig._resolve(cls, {})  # bad class attributes fail at definition
        own = cls.__dict__
        if "on_message" in own and not getattr(own["on_message"], "_heartbeat_wrapped", False):
            cls.on_message = _intercept_on_message(own["on_message"])  # type: ignore[method-assign,assignment]
        if "on_pong" in own and not getattr(own["on_pong"], "_heartbeat_wrapped", False):
            cls.on_pong = _intercept_on_pong(own["on_pong"])  # type: ignore[method-assign,assignment]
        if "on_ping" in own and not getattr(own["on_ping"], "_heartbeat_wrapped", False):
            cls.on_ping = _intercept_on_ping(own["on_ping"])  # type: ignore[method-assign,assignment]

    @property
    def latency(self) -> float | None:
        """Last heartbeat round-trip time in seconds; ``None`` before the first answer."""
        state = self._heartbeat
        return None if state is None else state.latency

    @property
    def heartbeat_timed_out(self) -> bool:
        """True when this connection was closed because the peer went silent."""
        state = self._heartbeat
        return state is not None and state.timed_out

    @property
    def heartbeat_stats(self) -> HeartbeatStats:
        """A snapshot of the application's heartbeat counters (:func:`heartbeat_stats`)."""
        return heartbeat_stats(self.application)

    def is_heartbeat_reply(self, message: str) -> bool:
        """Whether a text ``message`` answers an application-level heartbeat.

        Default: equal to ``heartbeat_reply``. Override for looser matching
        (e.g. parse JSON). Only called in ``"application"`` mode.
        """
        return message == self._heartbeat_reply_text

    @property
    @override
    def ping_interval(self) -> float | None:
        """Tornado's ping interval: ``None`` while this mixin's heartbeats are on."""
        if self._heartbeat is not None:
            return None
        interval: float | None = self.settings.get("websocket_ping_interval")
        return interval

    @override
    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Start heartbeats for the new connection (then Tornado's protocol as usual)."""
        config = HeartbeatConfig.for_handler(self)
        state: HeartbeatState | None = None
        if config.interval is not None:
            timeout = config.effective_timeout
            assert timeout is not None
            state = HeartbeatState(config.interval, timeout, asyncio.get_running_loop().time())
            if config.mode == "protocol":
                state.frame = _PING_FRAME
            else:
                state.frame = build_frame(OP_TEXT, config.message.encode("utf-8"))
                self._heartbeat_reply_text = config.reply
            self._heartbeat = state  # before super(): the ping_interval property reads it
            tornado_interval = self.settings.get("websocket_ping_interval")
            if tornado_interval:
                # Shown once per handler class by Python's default warning filter.
                warnings.warn(
                    f"{type(self).__name__}: websocket_ping_interval={tornado_interval!r} is "
                    "ignored because HeartbeatMixin heartbeats are on; set heartbeat_interval "
                    "instead, or heartbeat_interval = None to use Tornado's pings",
                    RuntimeWarning,
                    stacklevel=2,
                )
        protocol = super().get_websocket_protocol()
        if state is not None:
            if protocol is None:
                self._heartbeat = None
                return None
            counters = state.counters = HeartbeatCounters.for_application(self.application)
            counters.connections += 1
            scheduler = HeartbeatScheduler.current()
            # Not gc_tuning_stats(): it counts the frozen objects (a walk of them all),
            # and this runs for every connection.
            if self.settings.get("heartbeat_gc_freeze") and not _tuning_active():
                tune_gc()  # once per process; calling tune_gc() at start-up is clearer
            scheduler.add(self, state, state.last_activity)
        return protocol

    @override
    def on_pong(self, data: bytes) -> None:
        """Record heartbeat answers; then Tornado's ``on_pong`` (overriding it is fine)."""
        state = self._heartbeat
        if state is not None:
            if data == PING_PAYLOAD and state.frame is _PING_FRAME:
                self._heartbeat_answer(state)
            else:
                self._heartbeat_seen(state)
        super().on_pong(data)

    @override
    def on_ping(self, data: bytes) -> None:
        """Count a ping from the peer as activity; then Tornado's ``on_ping``."""
        state = self._heartbeat
        if state is not None:
            self._heartbeat_seen(state)
        super().on_ping(data)

    @override
    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Swallow application-level heartbeat replies; pass anything else on."""
        state = self._heartbeat
        if (
            state is not None
            and state.frame is not _PING_FRAME
            and isinstance(message, str)
            and self.is_heartbeat_reply(message)
        ):
            self._heartbeat_answer(state)
            return None
        if state is not None:
            self._heartbeat_seen(state)
        return super().on_message(message)

    @override
    def on_connection_close(self) -> None:
        """Stop heartbeats, then Tornado's close handling (``on_close`` runs once)."""
        state = self._heartbeat
        if state is not None and state._slot is not None:
            HeartbeatScheduler.current().discard(self, state)
        ws = self.ws_connection
        stream = None if ws is None else ws.stream
        super().on_connection_close()
        # A stream closed by an error (a reset peer) holds itself through the
        # error's traceback: drop it, so the connection is freed by refcounting.
        release_error(stream)

    def _heartbeat_progress(self) -> int | None:
        # The I/O counters at this instant, so that the bytes of the frame just
        # received are dated now and not again at the next check.
        ws = self.ws_connection
        stream = None if ws is None else ws.stream
        if ws is None or stream is None:
            return None
        return read_progress(ws, stream)

    def _heartbeat_seen(self, state: HeartbeatState) -> None:
        state.activity(asyncio.get_running_loop().time(), self._heartbeat_progress())

    def _heartbeat_answer(self, state: HeartbeatState) -> None:
        rtt = state.answer(asyncio.get_running_loop().time(), self._heartbeat_progress())
        if rtt is not None and state.counters is not None:
            state.counters.record_latency(rtt)

    def _heartbeat_expire(self, stream: IOStream) -> None:
        """Abort a connection whose peer went silent (called by the scheduler)."""
        state = self._heartbeat
        if state is not None and state.counters is not None:
            state.counters.timeouts += 1
            state.counters = None
        _log.debug("heartbeat timeout: dropping %s", self.request.remote_ip, extra=log_fields(self))
        if stream.writing():
            # The peer is not draining what we wrote: reset, freeing the kernel's buffers.
            abort_stream(stream)
            return
        ws = self.ws_connection
        if ws is not None and not ws.is_closing():
            # Best effort, never waited for: a peer that is merely slow learns why.
            try:
                try_send(stream, _TIMEOUT_CLOSE_FRAME)
            except OSError:
                pass
        stream.close()
