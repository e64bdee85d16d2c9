"""The message *tail*: kind, publish time, tag and data in one byte string.

The same version 1 layout as the Redis backend's tail (see
:mod:`tornado_longconn.backends.redis`), kept here without a ``redis`` import
so that backends which do not need redis-py (NATS) can share it::

    <kind><time_us>:<taglen>:<tag><data>

``kind`` is ``t`` (text, ``data`` is UTF-8) or ``b`` (binary), ``time_us`` the
publisher's wall clock in integer microseconds, ``taglen`` the byte length of
the UTF-8 ``tag`` (empty when there is no tag).
"""

from __future__ import annotations

__all__ = ["decode_tail", "encode_tail"]


def encode_tail(data: str | bytes, tag: str | None, time_s: float) -> tuple[bytes, int]:
    """Encode a message; returns ``(tail, payload size in bytes)``.

    Raises :class:`TypeError` when ``data`` is neither ``str`` nor ``bytes``.
    """
    if isinstance(data, str):
        kind, raw = b"t", data.encode("utf-8")
    elif isinstance(data, bytes):
        kind, raw = b"b", data
    else:
        raise TypeError(f"backend data must be str or bytes, not {type(data).__name__}")
    if tag is None:
        return b"%s%d::%s" % (kind, round(time_s * 1_000_000), raw), len(raw)
    btag = tag.encode("utf-8")
    tail = b"%s%d:%d:%s%s" % (kind, round(time_s * 1_000_000), len(btag), btag, raw)
    return tail, len(raw)


def decode_tail(tail: bytes) -> tuple[str | bytes, str | None, float, int]:
    """Decode a tail into ``(data, tag, time, payload size)``.

    Raises :class:`ValueError` (or :class:`UnicodeDecodeError`) for a malformed tail.
    """
    kind = tail[:1]
    colon = tail.index(b":", 1)
    time_s = int(tail[1:colon]) / 1_000_000
    colon2 = tail.index(b":", colon + 1)
    taglen = tail[colon + 1 : colon2]
    if taglen:
        end = colon2 + 1 + int(taglen)
        tag: str | None = tail[colon2 + 1 : end].decode("utf-8")
    else:
        end = colon2 + 1
        tag = None
    raw = tail[end:]
    if kind == b"t":
        return raw.decode("utf-8"), tag, time_s, len(raw)
    if kind == b"b":
        return raw, tag, time_s, len(raw)
    raise ValueError(f"unknown message kind {kind!r}")
