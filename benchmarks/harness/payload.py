"""Benchmark payloads: 16 hex digits of a sequence number, then a fixed ASCII pattern.

``make_payload(seq, size)`` / ``PayloadMaker(size)(seq)`` build one; ``check_payload``
verifies one. The payload is ASCII, so the same bytes can go out as a binary frame, a
text frame, an SSE ``data:`` line or a JSON string.
"""

from __future__ import annotations

__all__ = ["SEQ_LEN", "PayloadMaker", "check_payload", "make_payload", "pattern_of"]

#: Length of the hex sequence number that starts every payload (the minimum size).
SEQ_LEN = 16
_UNIT = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_pattern = _UNIT * 64


def pattern_of(size: int) -> bytes:
    """The first ``size`` bytes of the fixed pattern (a payload is seq + pattern[16:])."""
    global _pattern
    while len(_pattern) < size:
        _pattern += _pattern
    return _pattern[:size]


def make_payload(seq: int, size: int) -> bytes:
    """Payload of message ``seq``: 16 hex digits of ``seq`` + ASCII pattern, ``size`` bytes.

    Raises ``ValueError`` if ``size < 16``.
    """
    if size < SEQ_LEN:
        raise ValueError(f"payload size must be >= {SEQ_LEN}, not {size}")
    return b"%016x" % seq + pattern_of(size)[SEQ_LEN:]


class PayloadMaker:
    """Builds ``make_payload(seq, size)`` quickly for a fixed ``size``: ``maker(seq)``."""

    __slots__ = ("size", "tail")

    def __init__(self, size: int) -> None:
        if size < SEQ_LEN:
            raise ValueError(f"payload size must be >= {SEQ_LEN}, not {size}")
        self.size = size
        self.tail = pattern_of(size)[SEQ_LEN:]

    def __call__(self, seq: int) -> bytes:
        return b"%016x" % seq + self.tail


def check_payload(seq: int, data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is exactly ``make_payload(seq, len(data))``."""
    n = len(data)
    return n >= SEQ_LEN and bytes(data) == make_payload(seq, n)
