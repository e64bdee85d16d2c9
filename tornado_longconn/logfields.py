"""Connection, remote address, user and topic on every library log record.

Every log line the library writes about a connection or a topic carries four
attributes on its :class:`logging.LogRecord`, passed with the standard
``extra`` argument, so a JSON formatter, ``structlog``'s stdlib integration or
a ``%(longconn_conn)s`` format string picks them up:

=================== =========================================================
attribute           value
=================== =========================================================
``longconn_conn``   the connection's short id
                    (:func:`~tornado_longconn.connections.connection_id`)
``longconn_remote`` the client's address (``request.remote_ip``)
``longconn_user``   ``str(handler.current_user)`` when the application has
                    already looked the user up (the library never calls
                    ``get_current_user`` to log)
``longconn_topic``  the topic (group name, long-poll or SSE topic, backend topic; the
                    topics joined by commas for a multi-topic SSE stream)
=================== =========================================================

A field that does not apply is ``None`` (a backend reconnect has no
connection; a heartbeat timeout has no topic); library records always have
all four. Records of other loggers do not: add :class:`LogFieldsFilter` to your
log *handler* so a format string that names the fields works for every record.

Your own handlers can log the same way with :class:`ConnectionLogAdapter`::

    log = ConnectionLogAdapter(logging.getLogger("chat"), self, topic="lobby")
    log.info("joined")   # the record has longconn_conn, _remote, _user, _topic
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

from ._tornado.web import known_current_user
from .connections import connection_id

__all__ = [
    "FIELDS",
    "FIELD_CONN",
    "FIELD_REMOTE",
    "FIELD_TOPIC",
    "FIELD_USER",
    "ConnectionLogAdapter",
    "LogFieldsFilter",
    "log_fields",
]

#: Record attribute: the connection id.
FIELD_CONN: Final = "longconn_conn"
#: Record attribute: the client's address.
FIELD_REMOTE: Final = "longconn_remote"
#: Record attribute: the user, when known.
FIELD_USER: Final = "longconn_user"
#: Record attribute: the topic.
FIELD_TOPIC: Final = "longconn_topic"
#: All four, in this order.
FIELDS: Final[tuple[str, ...]] = (FIELD_CONN, FIELD_REMOTE, FIELD_USER, FIELD_TOPIC)

_USER_LIMIT: Final = 200  # characters of a user's str() kept in a record


def _user(handler: Any) -> str | None:
    try:
        user = known_current_user(handler)
    except TypeError:  # not a RequestHandler with a __dict__
        return None
    if user is None:
        return None
    text = user if isinstance(user, str) else str(user)
    return text[:_USER_LIMIT]


def log_fields(handler: Any = None, *, topic: str | None = None) -> dict[str, str | None]:
    """The ``extra`` dict of a log call about ``handler`` (a request or WebSocket handler) and ``topic``.

    Always the four keys of :data:`FIELDS`; ``None`` where a field does not
    apply. Cheap (a few attribute reads), but meant for log calls, not for a
    per-message path.

    >>> log_fields(topic="lobby")
    {'longconn_conn': None, 'longconn_remote': None, 'longconn_user': None, 'longconn_topic': 'lobby'}
    """
    if handler is None:
        return {FIELD_CONN: None, FIELD_REMOTE: None, FIELD_USER: None, FIELD_TOPIC: topic}
    request = getattr(handler, "request", None)
    return {
        FIELD_CONN: connection_id(handler),
        FIELD_REMOTE: getattr(request, "remote_ip", None),
        FIELD_USER: _user(handler),
        FIELD_TOPIC: topic,
    }


class ConnectionLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A :class:`logging.LoggerAdapter` that adds a connection's fields to every record.

    ``handler`` (optional) is the connection's Tornado handler, ``topic`` the
    topic. The fields are computed per call (the user may become known later);
    an ``extra`` given to a call is merged over them.
    """

    def __init__(self, logger: logging.Logger, handler: Any = None, *, topic: str | None = None):
        super().__init__(logger, {})
        self.handler = handler
        self.topic = topic

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Merge the connection's fields into ``kwargs["extra"]``."""
        fields: dict[str, Any] = log_fields(self.handler, topic=self.topic)
        given: Mapping[str, Any] | None = kwargs.get("extra")
        if given:
            fields.update(given)
        kwargs["extra"] = fields
        return msg, kwargs


class LogFieldsFilter(logging.Filter):
    """Gives every record the four fields (``None`` where missing); never rejects a record.

    Add it to a log *handler* (``handler.addFilter(LogFieldsFilter())``) whose
    format names the fields, so that records of other libraries format too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Set the missing fields to ``None``; keep the record."""
        values = record.__dict__
        for name in FIELDS:
            if name not in values:
                values[name] = None
        return True
