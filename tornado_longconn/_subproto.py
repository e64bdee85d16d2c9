"""The subscriptions protocol v1 without I/O: names, frames, errors, cursor maps.

Everything here takes values and returns values, so that the parser and the
encoders are tested with hypothesis and no socket. The wire format is
``docs/reference/subscriptions-protocol.md``; the handler shells are
:mod:`tornado_longconn.subscriptions` (WebSocket) and
:mod:`tornado_longconn.subscriptions_http` (SSE, long-poll, HTTP publish).
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

from .exceptions import CursorError, LongConnError
from .log import Cursor, Message, parse_cursor

__all__ = [
    "ERROR_STATUS",
    "MAX_ID_LENGTH",
    "MAX_METHOD_LENGTH",
    "MAX_TOPIC_LENGTH",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "Request",
    "SubscriptionError",
    "binary_frame",
    "error_frame",
    "format_cursor_map",
    "frame",
    "is_topic",
    "message_object",
    "parse_binary_frame",
    "parse_cursor_map",
    "parse_frame",
    "parse_topics",
    "resync_frame",
    "resync_reason",
    "topic_envelope",
]

#: The protocol version sent in ``welcome``.
PROTOCOL_VERSION: Final = 1
#: Longest topic name (characters).
MAX_TOPIC_LENGTH: Final = 128
#: Longest string request id (characters).
MAX_ID_LENGTH: Final = 64
#: Longest ``call`` method name (characters).
MAX_METHOD_LENGTH: Final = 128
# Integer ids are below 2**53 (exact in a JavaScript number).
_MAX_INT_ID: Final = 2**53

_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9_\-.:@/+]{1,128}")

#: The HTTP-style status of every error code (see the protocol reference).
ERROR_STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "limit": 429,
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
}

_TYPES: Final = frozenset(
    ("subscribe", "unsubscribe", "publish", "call", "pong", "presence", "auth", "refresh")
)
# Longest token of an auth / refresh request (characters); auth.MAX_TOKEN_LENGTH.
_MAX_TOKEN: Final = 8192
# A presence cursor is the store's own (digits for Redis, a client id in memory).
_PRESENCE_CURSOR_MAX: Final = 64
_HEADER_LEN: Final = struct.Struct("!H")


class SubscriptionError(LongConnError):
    """A request refused with a protocol error ``code`` (see :data:`ERROR_STATUS`).

    Raise it from a hook (``authorize_subscribe``, ``authorize_publish``,
    ``on_call``) to choose the error reply: ``raise SubscriptionError("not_found",
    "no such method")``. With ``close=True`` the whole connection is refused:
    a WebSocket is closed with 4401 (code ``unauthorized``), 4403
    (``forbidden``) or 1008 (any other code); an HTTP request is answered with
    the code's status. ``reason`` is sent to the client: keep secrets out of it.
    Raises ``ValueError`` for a code that is not in :data:`ERROR_STATUS`.
    """

    def __init__(self, code: str, reason: str = "", *, close: bool = False) -> None:
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown error code {code!r}; one of {sorted(ERROR_STATUS)}")
        super().__init__(reason or code)
        self.code = code
        self.reason = reason or code
        self.close = close

    @property
    def status(self) -> int:
        """The HTTP-style status of :attr:`code`."""
        return ERROR_STATUS[self.code]


class ProtocolError(SubscriptionError):
    """A malformed frame: answered ``bad_request`` (or ``too_large``) and counted.

    ``id`` is the request id when it could be read (else None); ``topic`` likewise.
    """

    def __init__(
        self,
        reason: str,
        *,
        code: str = "bad_request",
        id: int | str | None = None,
        topic: str | None = None,
    ) -> None:
        super().__init__(code, reason)
        self.id = id
        self.topic = topic


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed client request (see :func:`parse_frame`).

    ``type`` is ``"subscribe"``, ``"unsubscribe"``, ``"publish"``, ``"call"``,
    ``"presence"``, ``"auth"``, ``"refresh"`` (``params``: the token) or ``"pong"``; ``id`` the client's request id (None only for
    ``pong``); ``topic`` for all but ``call`` and ``pong``; ``cursor`` a
    subscribe's cursor (None: from now); ``params`` a subscribe's or call's
    params (None when absent), for ``presence`` ``{"cursor", "limit"}``;
    ``data`` a publish's payload, as compact JSON text (``str``) or the bytes of
    a binary publish; ``method`` a call's method.
    """

    type: str
    id: int | str | None = None
    topic: str | None = None
    cursor: Cursor | None = None
    params: Any = None
    data: str | bytes | None = None
    method: str | None = None


def is_topic(value: object) -> bool:
    """True when ``value`` is a valid topic name (1-128 of ``A-Za-z0-9_-.:@/+``).

    >>> is_topic("room:1"), is_topic("a,b"), is_topic("")
    (True, False, False)
    """
    return isinstance(value, str) and _TOPIC_RE.fullmatch(value) is not None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, big ints
        raise ProtocolError(f"not JSON: {str(exc)[:80]}") from None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _read_id(obj: dict[str, Any]) -> int | str | None:
    value = obj.get("id")
    if isinstance(value, bool):
        raise ProtocolError("id must be an integer or a string")
    if isinstance(value, int):
        if 0 <= value < _MAX_INT_ID:
            return value
        raise ProtocolError("id out of range (0 <= id < 2**53)")
    if isinstance(value, str):
        if 1 <= len(value) <= MAX_ID_LENGTH:
            return value
        raise ProtocolError(f"a string id has 1 to {MAX_ID_LENGTH} characters")
    if value is None:
        raise ProtocolError("missing id")
    raise ProtocolError("id must be an integer or a string")


def _request(obj: Any, payload: bytes | None = None) -> Request:
    if not isinstance(obj, dict):
        raise ProtocolError("a frame is a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:
        try:
            rid = _read_id(obj)
        except ProtocolError:
            rid = None
        shown = kind[:40] if isinstance(kind, str) else kind
        raise ProtocolError(f"unknown type {shown!r}", id=rid)
    if kind == "pong":
        return Request("pong")
    rid = _read_id(obj)
    if kind == "call":
        method = obj.get("method")
        if not isinstance(method, str) or not 1 <= len(method) <= MAX_METHOD_LENGTH:
            raise ProtocolError(f"method must be a string of 1 to {MAX_METHOD_LENGTH}", id=rid)
        return Request("call", rid, params=obj.get("params"), method=method)
    if kind == "auth" or kind == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not 1 <= len(token) <= _MAX_TOKEN:
            raise ProtocolError(f"token must be a string of 1 to {_MAX_TOKEN}", id=rid)
        return Request(kind, rid, params=token)
    topic = obj.get("topic")
    if not is_topic(topic):
        raise ProtocolError(
            "topic must be 1 to 128 characters from A-Z a-z 0-9 _ - . : @ / +", id=rid
        )
    assert isinstance(topic, str)
    if kind == "subscribe":
        raw = obj.get("cursor")
        cursor = None
        if raw is not None:
            try:
                cursor = parse_cursor(raw)
            except CursorError as exc:
                raise ProtocolError(str(exc), id=rid, topic=topic) from None
        return Request("subscribe", rid, topic, cursor, obj.get("params"))
    if kind == "unsubscribe":
        return Request("unsubscribe", rid, topic)
    if kind == "presence":
        page = obj.get("cursor")
        if page is not None and (
            not isinstance(page, str) or not 1 <= len(page) <= _PRESENCE_CURSOR_MAX
        ):
            raise ProtocolError("a presence cursor is a string or null", id=rid, topic=topic)
        limit = obj.get("limit")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000
        ):
            raise ProtocolError("limit is an integer from 1 to 1000", id=rid, topic=topic)
        return Request("presence", rid, topic, params={"cursor": page, "limit": limit})
    # publish
    if payload is not None:
        return Request("publish", rid, topic, data=payload)
    if "data" not in obj:
        raise ProtocolError("publish needs data", id=rid, topic=topic)
    return Request("publish", rid, topic, data=_dumps(obj["data"]))


def parse_frame(message: str | bytes, *, max_size: int) -> Request:
    """Parse one client frame (text: a JSON object; bytes: the binary publish form).

    Raises :class:`ProtocolError` (code ``bad_request``, or ``too_large`` for a
    frame over ``max_size`` bytes) with the request id when it could be read.
    Never raises anything else, whatever the input.

    >>> parse_frame('{"type":"subscribe","id":1,"topic":"room:1"}', max_size=1000)
    Request(type='subscribe', id=1, topic='room:1', cursor=None, params=None, data=None, method=None)
    >>> parse_frame('{"type":"publish","id":"a","topic":"t","data":{"x":1}}', max_size=1000).data
    '{"x":1}'
    """
    size = len(message)
    if not isinstance(message, bytes) and size * 4 > max_size:
        size = len(message.encode("utf-8", "replace"))
    if size > max_size:
        raise ProtocolError(f"frame of {size} bytes over the limit of {max_size}", code="too_large")
    if isinstance(message, bytes):
        header, payload = parse_binary_frame(message)
        if header.get("type") != "publish":
            raise ProtocolError("a binary frame is a publish", id=_safe_id(header))
        return _request(header, payload)
    return _request(_loads(message))


def _safe_id(obj: dict[str, Any]) -> int | str | None:
    try:
        return _read_id(obj)
    except ProtocolError:
        return None


def parse_binary_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a binary frame into its JSON header (an object) and its payload.

    The form: 2-byte big-endian header length ``n``, ``n`` bytes of UTF-8 JSON,
    then the payload. Raises :class:`ProtocolError` when malformed.

    >>> parse_binary_frame(binary_frame({"topic": "t"}, b"\\x00\\x01"))
    ({'topic': 't'}, b'\\x00\\x01')
    """
    if len(frame) < 2:
        raise ProtocolError("binary frame shorter than its 2-byte header length")
    (n,) = _HEADER_LEN.unpack_from(frame)
    if len(frame) < 2 + n:
        raise ProtocolError("binary frame shorter than its header length says")
    header = _loads(frame[2 : 2 + n])
    if not isinstance(header, dict):
        raise ProtocolError("a binary frame's header is a JSON object")
    return header, frame[2 + n :]


def binary_frame(header: dict[str, Any], payload: bytes) -> bytes:
    """Build the binary form: 2-byte header length, JSON ``header``, ``payload``.

    Raises ``ValueError`` when the header's JSON is longer than 65,535 bytes.
    """
    head = _dumps(header).encode("utf-8")
    if len(head) > 0xFFFF:
        raise ValueError("binary frame header longer than 65535 bytes")
    return _HEADER_LEN.pack(len(head)) + head + payload


def frame(obj: dict[str, Any]) -> str:
    """A server frame as compact JSON text."""
    return _dumps(obj)


def error_frame(
    id: int | str | None, code: str, reason: str, *, topic: str | None = None
) -> dict[str, Any]:
    """The ``error`` reply (``topic`` added when the request named one)."""
    out: dict[str, Any] = {
        "type": "error",
        "id": id,
        "code": code,
        "status": ERROR_STATUS[code],
        "reason": reason,
    }
    if topic is not None:
        out["topic"] = topic
    return out


def resync_reason(reason: str) -> str:
    """The protocol's resync reason for a library gap reason.

    ``"epoch"`` stays; ``"evicted"`` (history no longer reaches back) is
    ``"trimmed"``; anything else (``"future"``, a backend's lost connection) is
    ``"gap"``.

    >>> resync_reason("evicted"), resync_reason("epoch"), resync_reason("reconnect")
    ('trimmed', 'epoch', 'gap')
    """
    if reason == "epoch":
        return "epoch"
    if reason == "evicted":
        return "trimmed"
    return "gap"


def resync_frame(topic: str, cursor: Cursor | None, reason: str) -> str:
    """The ``resync`` frame (the group's notice function for protocol topics)."""
    return _dumps(
        {
            "type": "resync",
            "topic": topic,
            "cursor": None if cursor is None else str(cursor),
            "reason": resync_reason(reason),
        }
    )


def _json_body(data: str) -> str:
    """``data`` itself when it is JSON text, else ``data`` as a JSON string."""
    try:
        json.loads(data)
    except ValueError:
        return json.dumps(data, ensure_ascii=False)
    return data


def topic_envelope(message: Message) -> str | bytes:
    """The message as the protocol sends it: ``{"topic","cursor","data"}`` text.

    Built once per message per topic (it is the envelope of every protocol
    topic's group). Text that is JSON is embedded as is; other text becomes a
    JSON string. Bytes become the binary form with the header
    ``{"topic","cursor"}``.

    >>> topic_envelope(Message("room:1", '{"a":1}', Cursor("e", 3)))
    '{"topic":"room:1","cursor":"e-3","data":{"a":1}}'
    """
    cursor = message.cursor
    data = message.data
    if isinstance(data, bytes):
        header = {"topic": message.topic, "cursor": None if cursor is None else str(cursor)}
        return binary_frame(header, data)
    topic = json.dumps(message.topic, ensure_ascii=False)
    cur = '"' + str(cursor) + '"' if cursor is not None else "null"
    return '{"topic":' + topic + ',"cursor":' + cur + ',"data":' + _json_body(data) + "}"


def message_object(message: Message) -> dict[str, Any]:
    """The message as a JSON-ready object for SSE and long-poll.

    ``{"topic","cursor","data"}``; bytes are base64 in ``data`` with
    ``"binary": true`` added (SSE and JSON cannot carry raw bytes).
    """
    cursor = None if message.cursor is None else str(message.cursor)
    data = message.data
    if isinstance(data, bytes):
        return {
            "topic": message.topic,
            "cursor": cursor,
            "data": base64.b64encode(data).decode("ascii"),
            "binary": True,
        }
    try:
        value = json.loads(data)
    except ValueError:
        value = data
    return {"topic": message.topic, "cursor": cursor, "data": value}


def parse_topics(text: str, *, max_topics: int) -> list[str]:
    """Parse ``room:1,dm:ann`` into topics; ``ValueError`` when malformed or over the limit.

    Duplicates are an error; an empty string is no topics.
    """
    if not text:
        return []
    if len(text) > max_topics * (MAX_TOPIC_LENGTH + 1):
        raise ValueError("topics list too long")
    topics = text.split(",")
    if len(topics) > max_topics:
        raise ValueError(f"more than {max_topics} topics")
    seen: set[str] = set()
    for topic in topics:
        if not is_topic(topic):
            raise ValueError(f"invalid topic {topic[:40]!r}")
        if topic in seen:
            raise ValueError(f"topic {topic!r} twice")
        seen.add(topic)
    return topics


# "<topic>=<cursor or empty>": a cursor is at most 32 + 1 + 19 characters.
_MAX_ENTRY: Final = MAX_TOPIC_LENGTH + 1 + 52


def parse_cursor_map(text: str, *, max_topics: int) -> dict[str, Cursor | None]:
    """Parse a cursor map ``topic=cursor,topic=cursor`` (an empty cursor: from now).

    Bounded: at most ``max_topics`` entries and the length they can need. Raises
    ``ValueError`` for anything malformed (bad topic, bad cursor, a topic twice,
    a missing ``=``, too long).

    >>> parse_cursor_map("room:1=e-17,dm:ann=", max_topics=10)
    {'room:1': Cursor(epoch='e', offset=17), 'dm:ann': None}
    """
    if not text:
        return {}
    if len(text) > max_topics * (_MAX_ENTRY + 1):
        raise ValueError("cursor map too long")
    entries = text.split(",")
    if len(entries) > max_topics:
        raise ValueError(f"cursor map with more than {max_topics} topics")
    out: dict[str, Cursor | None] = {}
    for entry in entries:
        topic, sep, raw = entry.partition("=")
        if not sep:
            raise ValueError(f"cursor map entry without '=': {entry[:40]!r}")
        if not is_topic(topic):
            raise ValueError(f"invalid topic {topic[:40]!r} in cursor map")
        if topic in out:
            raise ValueError(f"topic {topic!r} twice in cursor map")
        try:
            out[topic] = parse_cursor(raw) if raw else None
        except CursorError as exc:
            raise ValueError(str(exc)) from None
    return out


def format_cursor_map(cursors: dict[str, Cursor | None]) -> str:
    """The wire form of a cursor map (inverse of :func:`parse_cursor_map`).

    >>> format_cursor_map({"room:1": Cursor("e", 17), "dm:ann": None})
    'room:1=e-17,dm:ann='
    """
    return ",".join(f"{t}={'' if c is None else c}" for t, c in cursors.items())
