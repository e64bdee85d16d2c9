"""The broadcast fan-out's per-member write loop, with its raw socket writes (internal).

It lives in the door because it is the library's hottest path through Tornado's
internals: for each member it reads three private ``IOStream`` fields (the write
indexes and ``_closed``: is the stream idle?) and, when it is, calls the
socket's ``send()`` itself. As function calls (:func:`.iostream.send_if_idle`)
those cost a sixth of a paced delivery (callgrind: 4,382 instructions per
delivery against 3,522 inline), so they are inlined here, in one place, and
checked with the rest of :mod:`.iostream` (Tornado 6.4.2, 6.5.2, 6.6.1).

Everything else about a writer stays in :mod:`tornado_longconn.backpressure`:
this loop only serves the two cases that need no decision beyond the writer's
flow rule (join this iteration's cork; a whole frame straight to an idle socket)
and hands every other case to the writer's ``_offer``.
``tests/test_backpressure_fanout.py`` holds it to ``send_nowait`` counter by
counter.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Protocol

from .iostream import StreamInternals

if TYPE_CHECKING:
    from .._frames import Encoded

__all__ = ["FanoutState", "FanoutWriter", "offer_all"]


class FanoutState(Protocol):
    """The :class:`~tornado_longconn.backpressure.FlowState` fields the loop updates."""

    corked: int
    pending: int
    high_water: int
    messages_sent: int
    bytes_sent: int
    direct_messages: int
    direct_bytes: int


class FanoutWriter(Protocol):
    """The :class:`~tornado_longconn.backpressure.BackpressureWriter` fields the loop reads."""

    _fast_sock: socket.socket | None
    _flusher: Any
    _dirty: bool
    _epoch: int
    _cork: list[bytes]

    @property
    def _state(self) -> FanoutState: ...

    @property
    def _stream(self) -> object: ...

    def _offer(self, encoded: Encoded) -> Any: ...

    def _sent_direct(self, frame: bytes, sent: int) -> Any: ...


def offer_all(
    writers: tuple[FanoutWriter, ...],
    encoded: Encoded,
    results: list[Any],
    cork_limit: int,
    written: object,
) -> None:
    """``send_nowait(encoded)`` to ``writers[len(results):]``, appending each result.

    ``cork_limit`` is the writer's cork limit for this frame's size (0 for a
    large frame, which never stays corked) and ``written`` the result to append
    for a frame taken (``SendResult.WRITTEN``). Two cases are served here, for a
    plain WebSocket writer that is open with nothing queued (``_fast_sock``
    set): frames already corked in this iteration (the frame joins the cork
    when ``FlowState.admit`` would answer "commit, no flush"), and nothing
    corked, nothing pending in the stream and nothing written yet in this
    iteration (the frame goes straight to the socket, counted in
    ``FlowState.direct_messages`` / ``direct_bytes``). Any other case goes
    through the writer's ``_offer``. Raises what a writer raises (a bug);
    ``results`` then says how far it got.
    """
    if len(results) >= len(writers):
        return
    append = results.append
    frame = encoded.frame
    size = len(frame)
    flusher = writers[0]._flusher
    epoch = flusher.epoch
    direct = False
    for writer in writers[len(results) :] if results else writers:
        sock = writer._fast_sock
        if sock is not None and writer._flusher is flusher:
            if writer._dirty:
                # FlowState.admit(size) answering 1 (commit, no flush), inlined: a
                # method call is a third of the per-member cost of a burst.
                # _fast_sock implies nothing is queued.
                state = writer._state
                corked = state.corked + size
                if corked < cork_limit and corked + state.pending <= state.high_water:
                    writer._cork.append(frame)
                    state.corked = corked
                    state.messages_sent += 1
                    state.bytes_sent += size
                    append(written)
                    continue
            elif writer._epoch != epoch:
                stream: StreamInternals = writer._stream  # type: ignore[assignment]
                if (
                    stream._total_write_index == stream._total_write_done_index
                    and not stream._closed
                ):
                    try:
                        sent = sock.send(frame)
                    except OSError:
                        append(writer._offer(encoded))  # would block, or the peer is gone
                        continue
                    if sent != size:
                        append(writer._sent_direct(frame, sent))
                        continue
                    # FlowState.sent(size, 0), inlined as its two direct counters
                    # (stats() adds them to messages, bytes and writes).
                    writer._epoch = epoch
                    state = writer._state
                    state.direct_messages += 1
                    state.direct_bytes += size
                    append(written)
                    direct = True
                    continue
        append(writer._offer(encoded))
    if direct and not flusher.scheduled:
        flusher.scheduled = True
        flusher.loop.call_soon(flusher.run)
