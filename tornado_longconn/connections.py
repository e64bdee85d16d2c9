"""Connection ids and open connections per transport.

Every connection the library's mixins handle gets a short id the first time
something asks for it (:func:`connection_id`): a per-process counter in
base 36, ``"c1"``, ``"c2s"``, ..., stored on the handler, made once per
connection. The same id is in every library log line about the connection
(:mod:`tornado_longconn.logfields`) and in the inspection endpoint's list of
writers (:mod:`tornado_longconn.inspect`), so an operator can follow one
connection from a metric to its logs.

The mixins also count the connections open now per transport, per
application, in a :class:`ConnectionCounters` at
``application.settings["longconn_connections"]``: WebSockets of
:class:`~tornado_longconn.strict.StrictWebSocketMixin` (and so of
:class:`~tornado_longconn.heartbeat.HeartbeatMixin` and the WebSocket upload
handler), SSE streams of :class:`~tornado_longconn.sse.SSEMixin`, and waiting
long-poll requests of :class:`~tornado_longconn.longpoll.LongPollMixin`. One
integer increment when a connection opens and one decrement when it closes;
nothing per message. Read them with :func:`connection_stats`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, Final

import tornado.web

from .stats import COUNTER, GAUGE

__all__ = [
    "TRANSPORTS",
    "ConnectionCounters",
    "ConnectionStats",
    "connection_id",
    "connection_stats",
]

#: The application setting that holds the :class:`ConnectionCounters`.
_SETTING: Final = "longconn_connections"
#: The ONE instance attribute the library adds to a handler (see :class:`_Slots`).
_SLOTS_ATTR: Final = "_longconn"
_DIGITS: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
_ids = itertools.count(1)

#: The transports counted, in the order of :class:`ConnectionStats`' fields.
TRANSPORTS: Final[tuple[str, ...]] = ("websocket", "sse", "longpoll")


class _Slots:
    """What the library keeps on one handler, behind one instance attribute (internal).

    CPython keeps the instances of a class in "split" dicts that share one key
    table while every instance has the same keys, up to about 28 of them; a
    Tornado ``WebSocketHandler`` already has 27. One key more than that turns
    the handler's dict into a dict of its own: about 1.3 KB per connection. So
    the connection id, the counted transport, the heartbeat state, the writer
    and the groups live in this slotted object (80 bytes) under one key.
    """

    __slots__ = ("conn_id", "groups", "heartbeat", "open_transport", "writer")

    def __init__(self) -> None:
        self.conn_id: str | None = None
        self.open_transport: str | None = None
        self.heartbeat: Any = None
        self.writer: Any = None
        self.groups: Any = None


def _slots_of(handler: Any) -> _Slots:
    """``handler``'s :class:`_Slots`, made on first use."""
    slots: _Slots | None = handler.__dict__.get(_SLOTS_ATTR)
    if slots is None:
        slots = _Slots()
        setattr(handler, _SLOTS_ATTR, slots)
    return slots


def _find_slots(handler: Any) -> _Slots | None:
    """``handler``'s :class:`_Slots` if it has them (never made here)."""
    attrs = getattr(handler, "__dict__", None)
    return None if attrs is None else attrs.get(_SLOTS_ATTR)


def _base36(n: int) -> str:
    out = ""
    while n:
        n, digit = divmod(n, 36)
        out = _DIGITS[digit] + out
    return out or "0"


def connection_id(handler: Any) -> str:
    """The connection's short id (``"c"`` + a per-process counter in base 36), made on first use.

    Stable for the life of ``handler``; unique within the process (several
    processes' logs are told apart by their own fields, e.g. the process id).

    >>> class Handler: pass
    >>> h = Handler()
    >>> connection_id(h) == connection_id(h) and connection_id(h).startswith("c")
    True
    """
    slots = _slots_of(handler)
    cid = slots.conn_id
    if cid is None:
        cid = slots.conn_id = "c" + _base36(next(_ids))
    return cid


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    """Connections open now per transport, and opened since start (see :class:`ConnectionCounters`)."""

    #: WebSocket connections open now (gauge).
    websocket: int = field(default=0, metadata=GAUGE)
    #: SSE streams open now (gauge).
    sse: int = field(default=0, metadata=GAUGE)
    #: Long-poll requests waiting now (gauge).
    longpoll: int = field(default=0, metadata=GAUGE)
    #: WebSocket connections opened (counter).
    websocket_opened: int = field(default=0, metadata=COUNTER)
    #: SSE streams started (counter).
    sse_opened: int = field(default=0, metadata=COUNTER)
    #: Long-poll requests that waited (counter).
    longpoll_opened: int = field(default=0, metadata=COUNTER)

    def open(self, transport: str) -> int:
        """Connections open now on ``transport`` (one of :data:`TRANSPORTS`)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        value: int = getattr(self, transport)
        return value

    def opened(self, transport: str) -> int:
        """Connections opened on ``transport`` since start (one of :data:`TRANSPORTS`)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        value: int = getattr(self, transport + "_opened")
        return value


class ConnectionCounters:
    """An application's live connection counters (see the module docs).

    One per application, at ``application.settings["longconn_connections"]``,
    created on first use. The mixins call :meth:`opened` and :meth:`closed`;
    read them with :meth:`stats` or :func:`connection_stats`.

    >>> counters = ConnectionCounters()
    >>> class Handler: pass
    >>> h = Handler()
    >>> counters.opened(h, "sse")
    >>> counters.stats().sse, counters.stats().sse_opened
    (1, 1)
    >>> counters.closed(h); counters.closed(h)  # once only
    >>> counters.stats().sse
    0
    """

    __slots__ = ("_changed", "_open", "_opened", "_websockets")

    def __init__(self) -> None:
        self._open = dict.fromkeys(TRANSPORTS, 0)
        self._opened = dict.fromkeys(TRANSPORTS, 0)
        # The open WebSocket handlers, in opening order (what a drain closes).
        self._websockets: dict[Any, None] = {}
        # Set on every close while someone waits in wait_closed (None: nobody).
        self._changed: asyncio.Event | None = None

    @classmethod
    def for_application(cls, application: tornado.web.Application) -> ConnectionCounters:
        """The application's counters (``settings["longconn_connections"]``), created if missing.

        Raises :class:`TypeError` if that setting holds something else.
        """
        counters = application.settings.get(_SETTING)
        if counters is None:
            counters = application.settings[_SETTING] = cls()
        if not isinstance(counters, ConnectionCounters):
            raise TypeError(
                f"settings[{_SETTING!r}] must be a ConnectionCounters, not {counters!r}"
            )
        return counters

    def opened(self, handler: Any, transport: str) -> None:
        """Count ``handler`` as open on ``transport`` (and give it its id); once per handler."""
        slots = _slots_of(handler)
        if slots.open_transport is not None:
            return
        if transport not in self._open:
            raise ValueError(f"unknown transport {transport!r}")
        connection_id(handler)
        slots.open_transport = transport
        if transport == "websocket":
            self._websockets[handler] = None
        self._open[transport] += 1
        self._opened[transport] += 1

    def closed(self, handler: Any) -> None:
        """Count ``handler`` as closed; a no-op if it is not counted as open (idempotent)."""
        slots = _find_slots(handler)
        transport = None if slots is None else slots.open_transport
        if slots is None or transport is None:
            return
        slots.open_transport = None
        if transport == "websocket":
            self._websockets.pop(handler, None)
        self._open[transport] -= 1
        if self._changed is not None:
            self._changed.set()

    def websockets(self) -> list[Any]:
        """The WebSocket handlers counted open now, oldest first (a copy)."""
        return list(self._websockets)

    async def wait_closed(self, transports: tuple[str, ...] = TRANSPORTS) -> None:
        """Return once no connection of ``transports`` is open (e.g. while draining).

        Wrap it in ``asyncio.wait_for`` for a deadline.
        """
        while any(self._open[t] for t in transports):
            changed = self._changed
            if changed is None:
                changed = self._changed = asyncio.Event()
            changed.clear()
            await changed.wait()

    def stats(self) -> ConnectionStats:
        """A snapshot of the counters (:class:`ConnectionStats`)."""
        o, n = self._open, self._opened
        return ConnectionStats(
            websocket=o["websocket"],
            sse=o["sse"],
            longpoll=o["longpoll"],
            websocket_opened=n["websocket"],
            sse_opened=n["sse"],
            longpoll_opened=n["longpoll"],
        )


def connection_stats(application: tornado.web.Application) -> ConnectionStats:
    """A snapshot of ``application``'s connection counters (:class:`ConnectionCounters`)."""
    return ConnectionCounters.for_application(application).stats()
