"""The client's I/O-free pieces: backoff, cursor order, the SSE parser, buffer policies."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import run_on_suite_loop
from tornado_longconn.client import (
    BufferPolicy,
    Client,
    PresenceChange,
    Resync,
    Subscription,
    TopicMessage,
    backoff_delay,
    is_after,
)
from tornado_longconn.client_http import SSEEvent, SSEParser


@given(st.integers(0, 200), st.floats(0, 0.999999))
def test_backoff_is_full_jitter_under_the_cap(attempt: int, r: float) -> None:
    delay = backoff_delay(attempt, 0.5, 30.0, lambda: r)
    assert 0 <= delay < min(30.0, 0.5 * 2 ** min(attempt, 62)) or delay == 0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 30.0), (-0.5, 30.0), (2.0, 1.0)])
def test_client_refuses_backoff_outside_0_lt_base_le_cap(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="base"):
        Client("ws://127.0.0.1:9/ws", backoff_base=base, backoff_cap=cap)
    with pytest.raises(ValueError, match="base"):
        backoff_delay(0, base, cap)


def test_is_after_orders_within_an_epoch_only() -> None:
    assert is_after("e-2", "e-1") and not is_after("e-1", "e-1") and not is_after("e-0", "e-1")
    assert is_after("f-0", "e-9") and is_after(None, "e-1") and is_after("bad", "e-1")


STREAM = (
    b"retry: 3000\nid: a=e-1\nevent: ready\ndata: {}\n\n"
    b": keep-alive\n\n"
    b"id: a=e-2\ndata: line1\ndata: line2\n\n"
    b'event: resync\r\ndata: {"x":1}\r\n\r\n'
)
EXPECTED = [
    SSEEvent("ready", "{}", "a=e-1"),
    SSEEvent("", "keep-alive"),
    SSEEvent("message", "line1\nline2", "a=e-2"),
    SSEEvent("resync", '{"x":1}'),
]


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_sse_parser_does_not_care_where_chunks_end(cuts: list[int]) -> None:
    parser = SSEParser()
    events: list[SSEEvent] = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        events.extend(parser.feed(STREAM[start:end]))
    assert events == EXPECTED


def _subscription(size: int, policy: BufferPolicy) -> tuple[Subscription, Client]:
    client = Client("ws://127.0.0.1:1/ws", buffer_size=size, buffer_policy=policy)
    sub = Subscription(client, "t", None, None, size, policy)
    return sub, client


def test_drop_oldest_keeps_a_marker_and_the_newest() -> None:
    async def main() -> None:
        for size in (1, 2, 5):
            sub, client = _subscription(size, BufferPolicy.DROP_OLDEST)
            for n in range(1, 21):
                sub._put(TopicMessage("t", f"e-{n}", n), client._counters)
            assert sub.buffered <= size
            first = await sub.get(1)
            assert isinstance(first, Resync) and first.reason == "overflow"
            rest = [await sub.get(1) for _ in range(sub.buffered)]
            if size == 1:
                assert first.cursor == "e-20" and rest == []
            else:
                # Delivery continues right after the marker's cursor.
                assert first.cursor == f"e-{20 - (size - 1)}"
                assert [m.data for m in rest] == list(range(22 - size, 21))  # type: ignore[union-attr]
            stats = client.stats()
            assert stats.dropped == 20 - len(rest)

    run_on_suite_loop(main())


def test_presence_changes_share_the_buffer_and_keep_the_cursor_of_messages() -> None:
    async def main() -> None:
        for size in (1, 2, 4):
            sub, client = _subscription(size, BufferPolicy.DROP_OLDEST)
            for n in range(1, 11):
                sub._put(TopicMessage("t", f"e-{n}", n), client._counters)
                sub._put(PresenceChange("t", "join", {"user": f"u{n}"}), client._counters)
            assert sub.buffered <= size
            first = await sub.get(1)
            assert isinstance(first, Resync) and first.reason == "overflow"
            # The marker's cursor is a message's (a presence change has none).
            assert first.cursor is not None and first.cursor.startswith("e-")
            rest = [await sub.get(1) for _ in range(sub.buffered)]
            if size > 1:
                assert isinstance(rest[-1], PresenceChange) and rest[-1].member == {"user": "u10"}

    run_on_suite_loop(main())


def test_block_waits_for_room() -> None:
    async def main() -> None:
        sub, client = _subscription(1, BufferPolicy.BLOCK)
        sub._put(TopicMessage("t", "e-1", 1), client._counters)
        waiting = asyncio.ensure_future(sub._wait_room())
        await asyncio.sleep(0)
        assert not waiting.done()
        assert (await sub.get(1)) == TopicMessage("t", "e-1", 1)
        await asyncio.wait_for(waiting, 1)

    run_on_suite_loop(main())
