"""The backend contract (``tornado_longconn.backends.base``), run on every backend.

Each test runs once per backend kind (see ``conftest.py``). For Redis, a "peer"
is a second backend on the same Redis: it stands for another process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from backend_helpers import Recorder

from tornado_longconn.backends import Backend, BackendStats
from tornado_longconn.exceptions import ConnectionClosedError
from tornado_longconn.log import Cursor, HistoryLimit

H = HistoryLimit(max_messages=100)
Peer = Callable[[], Awaitable[Any]]


def test_implements_the_protocol(backend: Backend) -> None:
    assert isinstance(backend, Backend)


async def test_subscriber_gets_every_message_in_publish_order(backend: Backend) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    published = [await backend.publish("t", f"m{i}", history=H) for i in range(20)]
    await rec.wait_messages(20)
    assert rec.data == [f"m{i}" for i in range(20)]
    assert [m.cursor for m in rec.messages] == [m.cursor for m in published]
    offsets = [m.cursor.offset for m in published if m.cursor]
    assert offsets == list(range(1, 21))
    assert rec.gaps == []


async def test_topics_are_separate(backend: Backend) -> None:
    a, b = Recorder("a"), Recorder("b")
    await backend.subscribe("ta", a)
    await backend.subscribe("tb", b)
    await backend.publish("ta", "for a", history=H)
    await backend.publish("tb", "for b", history=H)
    await a.wait_messages(1)
    await b.wait_messages(1)
    assert a.data == ["for a"]
    assert b.data == ["for b"]
    assert a.messages[0].topic == "ta"


async def test_every_process_sees_one_order(backend: Backend, make_peer: Peer) -> None:
    peer = await make_peer()
    here, there = Recorder("here"), Recorder("there")
    await backend.subscribe("t", here)
    await peer.subscribe("t", there)
    for i in range(10):
        await (backend if i % 2 else peer).publish("t", f"m{i}", history=H)
    await here.wait_messages(10)
    await there.wait_messages(10)
    assert here.data == there.data == [f"m{i}" for i in range(10)]
    assert [m.cursor for m in here.messages] == [m.cursor for m in there.messages]


async def test_unsubscribe_stops_delivery(backend: Backend) -> None:
    gone, stays = Recorder("gone"), Recorder("stays")
    await backend.subscribe("t", gone)
    await backend.subscribe("t", stays)
    await backend.publish("t", "both")
    await stays.wait_messages(1)
    await gone.wait_messages(1)
    await backend.unsubscribe("t", gone)
    await backend.unsubscribe("t", Recorder("never subscribed"))  # no error
    await backend.publish("t", "only stays")
    await stays.wait_messages(2)
    assert gone.data == ["both"]
    assert stays.data == ["both", "only stays"]


async def test_last_unsubscribe_then_subscribe_again(backend: Backend) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    await backend.unsubscribe("t", rec)
    await backend.subscribe("t", rec)
    await backend.publish("t", "after resubscribe")
    await rec.wait_messages(1)
    assert rec.data == ["after resubscribe"]


async def test_subscribe_twice_is_a_no_op(backend: Backend) -> None:
    rec, marker = Recorder(), Recorder("marker")
    await backend.subscribe("t", rec)
    await backend.subscribe("t", rec)
    await backend.subscribe("t", marker)
    await backend.publish("t", "once")
    await backend.publish("t", "twice")
    await marker.wait_messages(2)
    assert rec.data == ["once", "twice"]
    await backend.unsubscribe("t", rec)
    await backend.publish("t", "after")
    await marker.wait_messages(3)
    assert rec.data == ["once", "twice"]


async def test_tag_is_carried_to_subscribers_and_history(backend: Backend) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    sent = await backend.publish("t", "x", history=H, tag="conn-7:ä|:")
    await backend.publish("t", "y", history=H)
    await backend.publish("t", "z", history=H, tag="")
    await rec.wait_messages(3)
    assert [m.tag for m in rec.messages] == ["conn-7:ä|:", None, ""]
    assert sent.tag == "conn-7:ä|:"
    assert sent.cursor is not None
    got = await backend.since("t", Cursor(sent.cursor.epoch, 0))
    assert [m.tag for m in got.messages] == ["conn-7:ä|:", None, ""]


@pytest.mark.parametrize(
    "payload",
    ["plain", "", "ünïcødé ✓ 🚀", ":1:2:3:", b"", b"\x00\xff\xfe binary", b"t123::x", "x" * 70000],
)
async def test_text_stays_text_and_binary_stays_binary(backend: Backend, payload: Any) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    sent = await backend.publish("t", payload, history=H)
    await rec.wait_messages(1)
    (got,) = rec.messages
    assert type(got.data) is type(payload)
    assert got.data == payload
    assert sent.data == payload
    assert sent.cursor is not None
    (kept,) = (await backend.since("t", Cursor(sent.cursor.epoch, 0))).messages
    assert type(kept.data) is type(payload)
    assert kept.data == payload


async def test_other_data_types_are_refused(backend: Backend) -> None:
    with pytest.raises(TypeError):
        await backend.publish("t", {"not": "encoded"})  # type: ignore[arg-type]


async def test_message_time_is_the_publish_time(backend: Backend) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    sent = await backend.publish("t", "x")
    await rec.wait_messages(1)
    assert rec.messages[0].time == pytest.approx(sent.time, abs=1e-5)
    assert sent.time > 1_600_000_000


async def test_without_history_there_is_no_cursor(backend: Backend) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    sent = await backend.publish("t", "live only")
    await rec.wait_messages(1)
    assert sent.cursor is None
    assert rec.messages[0].cursor is None
    head = await backend.head("t")
    assert head.offset == 0


async def test_messages_without_history_take_no_offset(backend: Backend) -> None:
    first = await backend.publish("t", "a", history=H)
    await backend.publish("t", "live only")
    third = await backend.publish("t", "c", history=H)
    assert first.cursor is not None and third.cursor is not None
    assert third.cursor == first.cursor.next()
    got = await backend.since("t", Cursor(first.cursor.epoch, 0))
    assert [m.data for m in got.messages] == ["a", "c"]
    assert not got.gap


async def test_head_of_a_new_topic_is_offset_zero_of_the_epoch_to_come(backend: Backend) -> None:
    head = await backend.head("new")
    assert head.offset == 0
    assert head == await backend.head("new")
    got = await backend.since("new", head)
    assert (got.messages, got.cursor, got.gap) == ((), head, False)
    sent = await backend.publish("new", "first", history=H)
    assert sent.cursor == head.next()
    assert await backend.head("new") == sent.cursor
    after = await backend.since("new", head)
    assert [m.data for m in after.messages] == ["first"]
    assert after.cursor == sent.cursor


async def test_since_none_is_the_head_without_messages(backend: Backend) -> None:
    last = None
    for i in range(3):
        last = await backend.publish("t", f"m{i}", history=H)
    assert last is not None
    got = await backend.since("t", None)
    assert got.messages == ()
    assert got.cursor == last.cursor
    assert not got.gap


async def test_since_a_cursor_returns_what_came_after_it(backend: Backend) -> None:
    sent = [await backend.publish("t", f"m{i}", history=H) for i in range(6)]
    assert sent[2].cursor is not None
    got = await backend.since("t", sent[2].cursor)
    assert [m.data for m in got.messages] == ["m3", "m4", "m5"]
    assert [m.cursor for m in got.messages] == [m.cursor for m in sent[3:]]
    assert got.cursor == sent[5].cursor
    assert not got.gap
    limited = await backend.since("t", sent[2].cursor, limit=2)
    assert [m.data for m in limited.messages] == ["m3", "m4"]
    assert limited.cursor == sent[4].cursor
    rest = await backend.since("t", limited.cursor)
    assert [m.data for m in rest.messages] == ["m5"]
    at_head = await backend.since("t", sent[5].cursor)
    assert (at_head.messages, at_head.cursor, at_head.gap) == ((), sent[5].cursor, False)


async def test_history_reads_work_from_another_process(backend: Backend, make_peer: Peer) -> None:
    peer = await make_peer()
    sent = [await backend.publish("t", f"m{i}", history=H) for i in range(3)]
    assert sent[0].cursor is not None
    got = await peer.since("t", sent[0].cursor)
    assert [m.data for m in got.messages] == ["m1", "m2"]
    assert await peer.head("t") == sent[2].cursor


async def test_evicted_history_is_a_gap(backend: Backend) -> None:
    small = HistoryLimit(max_messages=3)
    sent = [await backend.publish("t", f"m{i}", history=small) for i in range(5)]
    first, head = sent[0].cursor, sent[-1].cursor
    assert first is not None and head is not None
    start = Cursor(first.epoch, 0)
    got = await backend.since("t", start)
    assert (got.gap, got.reason, got.messages, got.cursor) == (True, "evicted", (), head)
    just_in = await backend.since("t", sent[1].cursor)  # m2.. are kept
    assert [m.data for m in just_in.messages] == ["m2", "m3", "m4"]
    assert not just_in.gap
    one_too_old = await backend.since("t", first)  # m1 was evicted
    assert (one_too_old.gap, one_too_old.reason) == (True, "evicted")


async def test_bytes_limit_evicts_oldest(backend: Backend) -> None:
    limit = HistoryLimit(max_messages=100, max_bytes=10)
    sent = [await backend.publish("t", b"abcd", history=limit) for _ in range(5)]
    assert sent[0].cursor is not None
    kept = await backend.since("t", sent[2].cursor)
    assert len(kept.messages) == 2 and not kept.gap
    gone = await backend.since("t", sent[1].cursor)
    assert (gone.gap, gone.reason) == (True, "evicted")


async def test_cursor_from_another_epoch_is_a_gap(backend: Backend) -> None:
    sent = await backend.publish("t", "x", history=H)
    assert sent.cursor is not None
    foreign = Cursor("f0reign", sent.cursor.offset)
    got = await backend.since("t", foreign)
    assert (got.gap, got.reason, got.messages, got.cursor) == (True, "epoch", (), sent.cursor)
    never = await backend.since("never-published", Cursor("f0reign", 0))
    assert (never.gap, never.reason) == (True, "epoch")
    assert never.cursor.offset == 0


async def test_cursor_from_the_future_is_a_gap(backend: Backend) -> None:
    sent = await backend.publish("t", "x", history=H)
    assert sent.cursor is not None
    future = Cursor(sent.cursor.epoch, sent.cursor.offset + 5)
    got = await backend.since("t", future)
    assert (got.gap, got.reason, got.cursor) == (True, "future", sent.cursor)
    head = await backend.head("never-published")
    ahead = await backend.since("never-published", head.next())
    assert (ahead.gap, ahead.reason, ahead.cursor) == (True, "future", head)


async def test_a_failing_subscriber_does_not_stop_the_others(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Recorder):
        def on_message(self, message: Any) -> None:
            super().on_message(message)
            raise RuntimeError("subscriber bug")

    before, broken, after = Recorder("before"), Broken("broken"), Recorder("after")
    for sub in (before, broken, after):
        await backend.subscribe("t", sub)
    await backend.publish("t", "one")
    await backend.publish("t", "two")
    await after.wait_messages(2)
    assert before.data == broken.data == after.data == ["one", "two"]
    assert "subscriber bug" in caplog.text
    assert backend.stats().subscriber_errors == 2


async def test_stats_is_a_frozen_snapshot_built_when_called(backend: Backend) -> None:
    first = backend.stats()
    assert isinstance(first, BackendStats)
    assert (first.topics, first.subscribers, first.gaps, first.subscriber_errors) == (0, 0, 0, 0)
    assert first.published in (0, None) and first.received in (0, None)
    a1, a2, b = Recorder("a1"), Recorder("a2"), Recorder("b")
    await backend.subscribe("a", a1)
    await backend.subscribe("a", a2)
    await backend.subscribe("b", b)
    for i in range(3):
        await backend.publish("a", f"m{i}", history=H)
    await a1.wait_messages(3)
    await a2.wait_messages(3)
    now = backend.stats()
    assert now.kind == first.kind and now.connected
    assert (now.topics, now.subscribers) == (2, 3)
    # A backend that counts messages counts each once, whatever its subscribers.
    assert now.published in (3, None) and now.received in (3, None)
    assert (first.topics, first.subscribers) == (0, 0)  # the first snapshot did not change
    with pytest.raises(AttributeError):
        now.topics = 0  # type: ignore[misc]
    await backend.unsubscribe("b", b)
    assert (backend.stats().topics, backend.stats().subscribers) == (1, 2)
    await backend.close()
    assert not backend.stats().connected


async def test_many_subscribers_each_get_every_message(backend: Backend) -> None:
    recs = [Recorder(f"r{i}") for i in range(25)]
    for rec in recs:
        await backend.subscribe("t", rec)
    for i in range(5):
        await backend.publish("t", f"m{i}", history=H)
    for rec in recs:
        await rec.wait_messages(5)
        assert rec.data == [f"m{i}" for i in range(5)]


async def test_close_stops_delivery_and_is_idempotent(backend: Backend, make_peer: Peer) -> None:
    peer = await make_peer()
    rec = Recorder("closed")
    await backend.subscribe("t", rec)
    await backend.close()
    await backend.close()
    if peer is backend:  # the in-memory backend: publishing still works, delivers nothing
        with contextlib.suppress(ConnectionClosedError):
            await backend.publish("t", "after close")
        assert rec.messages == []
        return
    witness = Recorder("witness")
    await peer.subscribe("t", witness)
    await peer.publish("t", "after close")
    await witness.wait_messages(1)
    assert rec.messages == []
    with pytest.raises(ConnectionClosedError):
        await backend.publish("t", "from a closed backend")


async def test_history_never_runs_ahead_of_local_delivery(
    backend: Backend, make_peer: Peer
) -> None:
    """What ``since`` returns was already delivered to this process's subscribers.

    So a subscriber that replays history and then goes live sees no duplicate.
    """
    peer = await make_peer()
    rec = Recorder()
    await backend.subscribe("t", rec)
    start = await backend.head("t")
    ahead: list[Any] = []

    async def read() -> None:
        got = await backend.since("t", start)
        delivered = {m.cursor for m in rec.messages}  # checked the moment it returns
        ahead.extend(m.cursor for m in got.messages if m.cursor not in delivered)

    for round_ in range(10):
        await asyncio.gather(
            *(peer.publish("t", f"{round_}.{i}", history=H) for i in range(10)),
            *(read() for _ in range(10)),
        )
    assert ahead == []
    await rec.wait_messages(100)


async def test_publish_latency_counts_every_publish_once(backend: Backend) -> None:
    reader = getattr(backend, "publish_latency", None)
    assert reader is not None, "every backend of the library keeps a publish-latency histogram"
    first = reader()
    assert (first.count, first.sum) == (0, 0.0)
    for i in range(4):
        await backend.publish("lat", f"m{i}", history=H if i % 2 else None)
    now = reader()
    assert now.count == 4 and now.sum > 0
    assert now.cumulative()[-1] == (float("inf"), 4)
    assert first.count == 0  # a snapshot
