"""WebSocket protocol strictness (RFC 6455) for Tornado handlers.

Tornado's WebSocket reader is lenient: it accepts unmasked client frames,
echoes invalid close codes back, and on the protocol errors it detects drops
the TCP connection without a close frame. Mix :class:`StrictWebSocketMixin`
into a handler and every connection breaking the protocol is *failed* as RFC
6455 section 7.1.7 says: a close frame with the reason's code is sent (best
effort), then the TCP connection is closed.

* an unmasked frame -- 1002 ``frame not masked``
* RSV1-3 bits that no extension negotiated -- 1002 ``reserved bits set``
* an opcode RFC 6455 does not define (3-7, 11-15) -- 1002 ``unknown opcode``
* a control frame that is not final -- 1002 ``fragmented control frame``
* a control frame with more than 125 bytes -- 1002 ``control frame longer than 125 bytes``
* a continuation frame outside a fragmented message -- 1002 ``continuation without a message``
* a new data message inside a fragmented one -- 1002 ``new message inside a fragmented message``
* a close frame with an invalid code -- 1002 ``invalid close code``
* a close frame with a 1-byte payload -- 1002 ``close payload of 1 byte``
* a close frame whose reason is not UTF-8 -- 1007 ``close reason not UTF-8``
* a text message that is not UTF-8 -- 1007 ``text not UTF-8``
* a compressed message (permessage-deflate) that does not inflate -- 1002 ``decompression failed``
* a message above ``websocket_max_message_size`` -- 1009 ``message too big``

Invalid close codes are those :func:`is_valid_close_code` rejects; 1009 is
Tornado's own answer, kept (and counted).

Header checks happen as soon as a frame's first two bytes are read, before its
payload. A close frame with a valid code is still echoed with that code, as
Tornado does. Each failure is counted in the application's
:class:`ProtocolErrorCounters` (``application.settings["websocket_protocol_errors"]``);
read them with :func:`protocol_error_stats` (a :class:`ProtocolErrorStats` snapshot).

The handler's ``close_code`` is the code the client sent (``None`` without
one, or for a 1-byte payload), and ``close_reason`` is ``None`` when it was
not UTF-8; ``on_close`` runs once, as for any other close.

Example::

    class Chat(StrictWebSocketMixin, tornado.websocket.WebSocketHandler):
        def on_message(self, message):
            ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tornado.web
import tornado.websocket

from ._tornado.websocket import is_valid_close_code, make_strict
from .connections import ConnectionCounters
from .stats import COUNTER, TALLY

__all__ = [
    "ProtocolErrorCounters",
    "ProtocolErrorStats",
    "StrictWebSocketMixin",
    "is_valid_close_code",
    "protocol_error_stats",
]

#: The application setting that holds the :class:`ProtocolErrorCounters`.
_SETTING = "websocket_protocol_errors"


@dataclass(frozen=True, slots=True)
class ProtocolErrorStats:
    """A snapshot of the connections failed for breaking the WebSocket protocol.

    ``by_code`` and ``by_reason`` are tallies: ``(key, count)`` pairs sorted by
    key (``dict(stats.by_code)`` makes a mapping). All counters, since the
    counters were created; see :func:`protocol_error_stats`.
    """

    #: Connections failed since start.
    total: int = field(default=0, metadata=COUNTER)
    #: Connections failed, by the close code sent to the client.
    by_code: tuple[tuple[int, int], ...] = field(default=(), metadata=TALLY)
    #: Connections failed, by the close reason sent (a fixed set of strings).
    by_reason: tuple[tuple[str, int], ...] = field(default=(), metadata=TALLY)


class ProtocolErrorCounters:
    """The live counters behind :class:`ProtocolErrorStats`, per close code and reason.

    One per application, at ``application.settings["websocket_protocol_errors"]``
    (created on first use; put your own there to share one between
    applications). Updated only when a connection is failed, never per message.

    >>> counters = ProtocolErrorCounters()
    >>> counters.record(1002, "frame not masked")
    >>> counters.record(1007, "text not UTF-8")
    >>> counters.record(1002, "frame not masked")
    >>> counters.stats().by_code
    ((1002, 2), (1007, 1))
    """

    __slots__ = ("_by_code", "_by_reason", "_total")

    def __init__(self) -> None:
        self._total = 0
        self._by_code: dict[int, int] = {}
        self._by_reason: dict[str, int] = {}

    @classmethod
    def for_application(cls, application: tornado.web.Application) -> ProtocolErrorCounters:
        """The application's counters (``settings["websocket_protocol_errors"]``), created if missing.

        Raises :class:`TypeError` if that setting holds something else.
        """
        counters = application.settings.get(_SETTING)
        if counters is None:
            counters = application.settings[_SETTING] = cls()
        if not isinstance(counters, ProtocolErrorCounters):
            raise TypeError(
                f"settings[{_SETTING!r}] must be a ProtocolErrorCounters, not {counters!r}"
            )
        return counters

    def record(self, code: int, reason: str) -> None:
        """Count one connection failed with close ``code`` and ``reason``."""
        self._total += 1
        self._by_code[code] = self._by_code.get(code, 0) + 1
        self._by_reason[reason] = self._by_reason.get(reason, 0) + 1

    def stats(self) -> ProtocolErrorStats:
        """A snapshot of the counters (:class:`ProtocolErrorStats`)."""
        return ProtocolErrorStats(
            total=self._total,
            by_code=tuple(sorted(self._by_code.items())),
            by_reason=tuple(sorted(self._by_reason.items())),
        )


def protocol_error_stats(application: tornado.web.Application) -> ProtocolErrorStats:
    """A snapshot of ``application``'s protocol-error counters (see :class:`ProtocolErrorCounters`).

    Raises :class:`TypeError` if ``settings["websocket_protocol_errors"]`` holds
    something other than a :class:`ProtocolErrorCounters`.
    """
    return ProtocolErrorCounters.for_application(application).stats()


class StrictWebSocketMixin(tornado.websocket.WebSocketHandler):
    """Fail connections that break RFC 6455 with a close frame (1002, 1007, 1009).

    Put it before ``WebSocketHandler`` in the bases, and after
    :class:`~tornado_longconn.heartbeat.HeartbeatMixin` when you use both
    (``class Chat(HeartbeatMixin, StrictWebSocketMixin, WebSocketHandler)``).
    It changes only :meth:`get_websocket_protocol`: the
    protocol Tornado builds (with your compression options, ping settings and
    ``max_message_size``) is replaced by a strict subclass with the same
    parameters. What is checked and the codes sent: :mod:`tornado_longconn.strict`.

    If you override ``get_websocket_protocol``, call ``super()`` and return a
    protocol it returned. Returning a subclass of Tornado's protocol of your own
    from further down the bases raises
    :class:`~tornado_longconn.exceptions.LongConnError` at the handshake (Tornado
    answers 500): it cannot be made strict without losing what it changes.
    """

    @property
    def protocol_error_stats(self) -> ProtocolErrorStats:
        """A snapshot of the application's protocol-error counters (:func:`protocol_error_stats`)."""
        return protocol_error_stats(self.application)

    def check_origin(self, origin: str) -> bool:
        """The origin policy (:mod:`tornado_longconn.origin`): same-origin, or ``allowed_origins``."""
        from .origin import count_refused, request_origin_allowed

        if request_origin_allowed(self, origin):
            return True
        count_refused(self.application)
        return False

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Tornado's protocol for this connection, made strict (``None`` stays ``None``)."""
        protocol = super().get_websocket_protocol()
        if protocol is None:
            return None
        counters = ProtocolErrorCounters.for_application(self.application)
        strict = make_strict(protocol, self, counters.record)
        # Counted open (and given its id) from here; closed once, whichever comes first.
        ConnectionCounters.for_application(self.application).opened(self, "websocket")
        return strict

    def on_connection_close(self) -> None:
        """Count the connection as closed (:mod:`tornado_longconn.connections`); then Tornado's."""
        ConnectionCounters.for_application(self.application).closed(self)
        super().on_connection_close()

    def on_finish(self) -> None:
        """Count a handshake answered with an error (no WebSocket) as closed; then Tornado's."""
        if self.get_status() != 101:  # Tornado finishes the 101 answer too: still open then
            ConnectionCounters.for_application(self.application).closed(self)
        super().on_finish()
