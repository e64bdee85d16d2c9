"""LongPollWaiter: waiting after a cursor through the Backend protocol (no HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import run_on_suite_loop, wait_until
from tornado_longconn.backends.base import Backend, BackendStats, Subscriber
from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.exceptions import BackendUnavailableError, CursorError
from tornado_longconn.log import Cursor, HistoryLimit, Message, SinceResult
from tornado_longconn.longpoll import (
    LongPollWaiter,
    PollResult,
    RecentMessages,
    WaiterLimitError,
    check_timeout,
    message_to_json,
)
from tornado_longconn.testing import scaled

HISTORY = HistoryLimit(max_messages=1000)


class CountingBackend:
    """A Backend that delegates to another and counts the calls (Protocol only)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.subscribes = 0
        self.unsubscribes = 0
        self.sinces = 0
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.fail_subscribe = False
        self.gate: asyncio.Event | None = None  # when set: since() waits for it

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        self.subscribes += 1
        if self.fail_subscribe:
            raise BackendUnavailableError("down")
        self.subscribers.setdefault(topic, set()).add(subscriber)
        await self.inner.subscribe(topic, subscriber)

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        self.unsubscribes += 1
        self.subscribers.get(topic, set()).discard(subscriber)
        await self.inner.unsubscribe(topic, subscriber)

    async def publish(
        self,
        topic: str,
        data: str | bytes,
        *,
        history: HistoryLimit | None = None,
        tag: str | None = None,
    ) -> Message:
        return await self.inner.publish(topic, data, history=history, tag=tag)

    async def since(
        self, topic: str, cursor: Cursor | None, *, limit: int | None = None
    ) -> SinceResult:
        self.sinces += 1
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.since(topic, cursor, limit=limit)

    async def head(self, topic: str) -> Cursor:
        return await self.inner.head(topic)

    def stats(self) -> BackendStats:
        return self.inner.stats()


@pytest.fixture
def backend() -> CountingBackend:
    return CountingBackend(MemoryBackend(epoch="ep"))


async def publish(backend: Backend, data: str | bytes, topic: str = "t") -> Message:
    return await backend.publish(topic, data, history=HISTORY)


async def test_counting_backend_is_a_backend(backend: CountingBackend) -> None:
    assert isinstance(backend, Backend)


def test_check_timeout() -> None:
    assert check_timeout(0) == 0
    assert check_timeout(5, 10) == 5
    assert check_timeout(99, 10) == 10
    assert check_timeout(float("inf"), 10) == 10
    for bad in (-0.001, -5.0, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            check_timeout(bad)


def test_message_json_text_and_binary() -> None:
    assert message_to_json(Message("t", "hé", Cursor("e", 3))) == {"cursor": "e-3", "data": "hé"}
    assert message_to_json(Message("t", b"\x00\xff", Cursor("e", 4))) == {
        "cursor": "e-4",
        "data": "AP8=",
        "binary": True,
    }


def test_poll_result_json_is_encoded_once() -> None:
    result = PollResult([Message("t", "x", Cursor("e", 1))], Cursor("e", 1))
    body = result.to_json()
    assert (
        body
        == b'{"messages":[{"cursor":"e-1","data":"x"}],"cursor":"e-1","gap":false,"reason":null}'
    )
    assert result.to_json() is body


async def test_returns_at_once_when_messages_exist(backend: CountingBackend) -> None:
    first = await publish(backend, "a")
    await publish(backend, "b")
    waiter = LongPollWaiter(backend, "t")
    result = await asyncio.wait_for(waiter.wait(first.cursor, timeout=60), scaled(2))
    assert [m.data for m in result.messages] == ["b"]
    assert result.cursor == Cursor("ep", 2) and not result.gap
    # a string cursor works the same
    again = await waiter.wait("ep-0", timeout=0)
    assert [m.data for m in again.messages] == ["a", "b"]
    await waiter.close()


async def test_waits_for_next_publish(backend: CountingBackend) -> None:
    head = (await publish(backend, "a")).cursor
    waiter = LongPollWaiter(backend, "t")
    task = asyncio.ensure_future(waiter.wait(head, timeout=60))
    await wait_until(lambda: waiter.stats().parked == 1)
    assert not task.done()
    await publish(backend, "b")
    result = await asyncio.wait_for(task, scaled(2))
    assert [m.data for m in result.messages] == ["b"] and result.cursor == Cursor("ep", 2)
    assert waiter.stats().woken == 1
    await waiter.close()


async def test_timeout_returns_empty_at_same_cursor(backend: CountingBackend) -> None:
    head = (await publish(backend, "a")).cursor
    waiter = LongPollWaiter(backend, "t")
    result = await asyncio.wait_for(waiter.wait(head, timeout=scaled(0.02)), scaled(2))
    assert result.messages == () and result.cursor == head and not result.gap
    assert waiter.stats().timeouts == 1 and waiter.waiting == 0
    await waiter.close()


async def test_no_cursor_means_from_now_on(backend: CountingBackend) -> None:
    await publish(backend, "old")
    waiter = LongPollWaiter(backend, "t")
    now = await waiter.wait(None, timeout=0)
    assert now.messages == () and now.cursor == Cursor("ep", 1)
    task = asyncio.ensure_future(waiter.wait(None, timeout=60))
    await wait_until(lambda: waiter.stats().parked == 1)
    await publish(backend, "new")
    result = await asyncio.wait_for(task, scaled(2))
    assert [m.data for m in result.messages] == ["new"] and result.cursor == Cursor("ep", 2)
    await waiter.close()


async def test_errors(backend: CountingBackend) -> None:
    waiter = LongPollWaiter(backend, max_timeout=5)
    with pytest.raises(ValueError, match="timeout"):
        await waiter.wait("ep-0", -1, topic="t")
    with pytest.raises(CursorError):
        await waiter.wait("nonsense", 1, topic="t")
    with pytest.raises(ValueError, match="topic"):
        await waiter.wait("ep-0", 1)
    assert waiter.waiting == 0
    with pytest.raises(ValueError, match="max_timeout"):
        LongPollWaiter(backend, max_timeout=0)
    with pytest.raises(ValueError, match="max_waiters"):
        LongPollWaiter(backend, max_waiters=0)


async def test_evicted_and_foreign_epoch_cursors_are_gaps(backend: CountingBackend) -> None:
    for i in range(10):
        await backend.publish("t", str(i), history=HistoryLimit(max_messages=3))
    waiter = LongPollWaiter(backend, "t")
    head = Cursor("ep", 10)
    for cursor, reason in (("ep-2", "evicted"), ("other-5", "epoch"), ("ep-99", "future")):
        result = await asyncio.wait_for(waiter.wait(cursor, timeout=60), scaled(2))
        assert result.gap and result.reason == reason, cursor
        assert result.messages == () and result.cursor == head
    ok = await waiter.wait("ep-7", timeout=0)
    assert [m.data for m in ok.messages] == ["7", "8", "9"]
    assert waiter.stats().gaps == 3
    await waiter.close()


async def test_one_publish_wakes_5000_waiters_through_one_subscription(
    backend: CountingBackend,
) -> None:
    head = (await publish(backend, "first")).cursor
    waiter = LongPollWaiter(backend, "t")
    tasks = [asyncio.ensure_future(waiter.wait(head, timeout=60)) for _ in range(5000)]
    await wait_until(lambda: waiter.stats().parked == 5000)
    assert backend.subscribes == 1 and len(backend.subscribers["t"]) == 1
    sinces = backend.sinces
    await publish(backend, "wake")
    results = await asyncio.wait_for(asyncio.gather(*tasks), scaled(20))
    assert all(r is results[0] for r in results)  # one shared answer, encoded once
    assert [m.data for m in results[0].messages] == ["wake"]
    assert backend.sinces == sinces  # waking asked the backend nothing
    stats = waiter.stats()
    assert stats.woken == 5000 and stats.waiting == 0 and stats.answered == 5000
    await waiter.close()


async def test_cancelled_waits_leave_nothing_behind(backend: CountingBackend) -> None:
    waiter = LongPollWaiter(backend, "t", linger=0)
    tasks = [asyncio.ensure_future(waiter.wait(None, timeout=60)) for _ in range(1000)]
    await wait_until(lambda: waiter.stats().parked == 1000)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert waiter.waiting == 0 and waiter.stats().parked == 0
    assert waiter.stats().cancelled == 1000
    await wait_until(lambda: backend.unsubscribes == 1)
    assert not backend.subscribers["t"]
    await waiter.close()


async def test_waiter_limit_rejects(backend: CountingBackend) -> None:
    waiter = LongPollWaiter(backend, "t", max_waiters=2)
    tasks = [asyncio.ensure_future(waiter.wait(None, timeout=60)) for _ in range(2)]
    await wait_until(lambda: waiter.stats().parked == 2)
    with pytest.raises(WaiterLimitError):
        await waiter.wait(None, timeout=60)
    assert waiter.stats().rejected == 1
    await waiter.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), scaled(2))
    assert all(r.messages == () for r in results)  # close() answers pending waits


async def test_subscription_is_shared_and_lingers(backend: CountingBackend) -> None:
    waiter = LongPollWaiter(backend, "t", linger=60)
    for _ in range(3):
        await waiter.wait(None, timeout=0)
    assert backend.subscribes == 1 and backend.unsubscribes == 0
    assert waiter.stats().topics == 1
    await waiter.close()
    assert backend.unsubscribes == 1 and waiter.stats().topics == 0
    with pytest.raises(Exception, match="closed"):
        await waiter.wait(None, timeout=0)


async def test_failed_subscribe_is_raised_and_retried(backend: CountingBackend) -> None:
    waiter = LongPollWaiter(backend, "t")
    backend.fail_subscribe = True
    with pytest.raises(BackendUnavailableError):
        await waiter.wait(None, timeout=1)
    backend.fail_subscribe = False
    result = await waiter.wait(None, timeout=0)
    assert result.cursor == Cursor("ep", 0) and backend.subscribes == 2
    await waiter.close()


async def test_subscription_gap_makes_waiters_reread_history(backend: CountingBackend) -> None:
    head = (await publish(backend, "a")).cursor
    waiter = LongPollWaiter(backend, "t")
    task = asyncio.ensure_future(waiter.wait(head, timeout=60))
    await wait_until(lambda: waiter.stats().parked == 1)
    (subscriber,) = backend.subscribers["t"]
    # the subscription lost a message: it is in history, but was never delivered live
    await backend.unsubscribe("t", subscriber)
    await publish(backend, "missed")
    assert not task.done()
    subscriber.on_gap("t", "reconnected")
    result = await asyncio.wait_for(task, scaled(2))
    assert [m.data for m in result.messages] == ["missed"]
    assert waiter.stats().rechecks == 1
    await waiter.close()


async def test_message_after_unexpected_cursor_rechecks(backend: CountingBackend) -> None:
    # a waiter behind the head is woken to re-read, not handed the wrong message
    waiter = LongPollWaiter(backend, "t", recent=0)
    await publish(backend, "a")
    task = asyncio.ensure_future(waiter.wait("ep-1", timeout=60))
    await wait_until(lambda: waiter.stats().parked == 1)
    (subscriber,) = backend.subscribers["t"]
    # deliver a message from another epoch directly: the cursor does not follow
    subscriber.on_message(Message("t", "x", Cursor("zz", 1)))
    await wait_until(lambda: waiter.stats().rechecks == 1)
    assert not task.done()
    await publish(backend, "b")
    result = await asyncio.wait_for(task, scaled(2))
    assert [m.data for m in result.messages] == ["b"]
    await waiter.close()


async def test_messages_without_history_are_counted_not_delivered(
    backend: CountingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    waiter = LongPollWaiter(backend, "t")
    task = asyncio.ensure_future(waiter.wait(None, timeout=scaled(0.05)))
    await wait_until(lambda: waiter.stats().parked == 1)
    await backend.publish("t", "no history")
    await backend.publish("t", "no history")
    result = await asyncio.wait_for(task, scaled(2))
    assert result.messages == ()
    assert waiter.stats().uncursored == 2
    assert sum("without history" in r.message for r in caplog.records) == 1
    await waiter.close()


async def test_batches_are_capped(backend: CountingBackend) -> None:
    for i in range(7):
        await publish(backend, str(i))
    waiter = LongPollWaiter(backend, "t", max_batch=3)
    got: list[str] = []
    cursor = Cursor("ep", 0)
    for _ in range(3):
        result = await waiter.wait(cursor, timeout=0)
        got += [str(m.data) for m in result.messages]
        cursor = result.cursor
    assert got == [str(i) for i in range(7)]
    await waiter.close()


def test_recent_messages_window() -> None:
    recent = RecentMessages(size=3)
    assert recent.since(Cursor("e", 0)) is None
    for n in range(1, 6):
        recent.append(Message("t", str(n), Cursor("e", n)))
    assert recent.head == Cursor("e", 5)
    assert [m.data for m in recent.since(Cursor("e", 2)) or []] == ["3", "4", "5"]
    assert [m.data for m in recent.since(Cursor("e", 3), limit=1) or []] == ["4"]
    assert recent.since(Cursor("e", 1)) is None  # older than the window
    assert recent.since(Cursor("e", 5)) == []
    assert recent.since(Cursor("e", 6)) is None
    assert recent.since(Cursor("x", 5)) is None
    recent.append(Message("t", "skip", Cursor("e", 9)))  # not contiguous: restart
    assert recent.since(Cursor("e", 5)) is None
    assert [m.data for m in recent.since(Cursor("e", 8)) or []] == ["skip"]
    recent.append(Message("t", "none"))
    assert recent.head == Cursor("e", 9)
    recent.clear()
    assert recent.since(Cursor("e", 9)) is None and recent.head is None
    with pytest.raises(ValueError, match="size"):
        RecentMessages(-1)


@given(
    size=st.integers(0, 6),
    offsets=st.lists(st.integers(1, 12), max_size=30),
    ask=st.integers(0, 14),
)
def test_recent_messages_never_wrong(size: int, offsets: list[int], ask: int) -> None:
    """Whatever it answers is exactly the contiguous run after the cursor."""
    recent = RecentMessages(size)
    seen: list[int] = []
    for off in offsets:
        recent.append(Message("t", str(off), Cursor("e", off)))
        seen.append(off)
    answer = recent.since(Cursor("e", ask))
    if answer is None:
        return
    assert seen and seen[-1] >= ask
    expected = list(range(ask + 1, seen[-1] + 1))
    assert [m.cursor.offset for m in answer if m.cursor] == expected
    # and the run really was delivered contiguously at the end
    assert seen[len(seen) - len(expected) :] == expected


# One step of the lossy client scenario: publish n messages now, or poll (the
# answer is lost or not; the poll waits for a publish or answers at once).
_step = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 4)),
    st.tuples(st.just("poll"), st.booleans()),
    st.tuples(st.just("poll_then_publish"), st.booleans()),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(_step, max_size=25),
    recent=st.sampled_from([0, 2, 64]),
    max_batch=st.sampled_from([1, 3, 100]),
)
def test_lossy_client_receives_every_message_once_in_order(
    steps: list[tuple[str, Any]], recent: int, max_batch: int
) -> None:
    async def scenario() -> None:
        backend = MemoryBackend(epoch="ep")
        waiter = LongPollWaiter(backend, "t", recent=recent, max_batch=max_batch)
        published: list[str] = []
        received: list[str] = []
        cursor: Cursor | None = None

        async def pub(n: int) -> None:
            for _ in range(n):
                published.append(f"m{len(published)}")
                await backend.publish("t", published[-1], history=HISTORY)

        def take(result: PollResult, lost: bool) -> None:
            nonlocal cursor
            assert not result.gap
            if not lost:
                received.extend(str(m.data) for m in result.messages)
                cursor = result.cursor

        # the first poll has no cursor: "from now on", at the (empty) head
        take(await waiter.wait(None, timeout=0), lost=False)
        for kind, arg in steps:
            if kind == "publish":
                await pub(arg)
            elif kind == "poll":
                take(await waiter.wait(cursor, timeout=0), lost=arg)
            else:
                task = asyncio.ensure_future(waiter.wait(cursor, timeout=30))
                await asyncio.sleep(0)
                await pub(1)
                take(await asyncio.wait_for(task, 5), lost=arg)
        while True:  # catch up
            result = await waiter.wait(cursor, timeout=0)
            take(result, lost=False)
            if not result.messages:
                break
        assert received == published
        await waiter.close()

    run_on_suite_loop(scenario())


async def test_concurrent_history_reads_are_shared(backend: CountingBackend) -> None:
    await publish(backend, "a")
    waiter = LongPollWaiter(backend, "t")
    await waiter.wait(None, timeout=0)  # subscribed
    backend.gate = asyncio.Event()
    before = backend.sinces
    tasks = [asyncio.ensure_future(waiter.wait("ep-0", timeout=0)) for _ in range(300)]
    await wait_until(lambda: backend.sinces > before)
    backend.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), scaled(5))
    assert backend.sinces == before + 1  # one backend read for 300 waits
    assert all(r is results[0] for r in results)
    assert [m.data for m in results[0].messages] == ["a"]
    await waiter.close()


async def test_read_in_flight_is_not_joined_after_a_delivery(backend: CountingBackend) -> None:
    head = (await publish(backend, "a")).cursor
    waiter = LongPollWaiter(backend, "t", recent=0)
    await waiter.wait(None, timeout=0)
    backend.gate = asyncio.Event()
    before = backend.sinces
    first = asyncio.ensure_future(waiter.wait(head, timeout=30))
    await wait_until(lambda: backend.sinces == before + 1)
    # a message is delivered while the read is in flight; a new waiter must not
    # rely on that read (it may predate the message) and must not miss the message
    await publish(backend, "b")
    second = asyncio.ensure_future(waiter.wait(head, timeout=30))
    await wait_until(lambda: backend.sinces == before + 2)
    backend.gate.set()
    for task in (first, second):
        result = await asyncio.wait_for(task, scaled(5))
        assert [m.data for m in result.messages] == ["b"]
    await waiter.close()


async def test_failed_shared_read_reaches_every_waiter(backend: CountingBackend) -> None:
    class Down(CountingBackend):
        async def since(
            self, topic: str, cursor: Cursor | None, *, limit: int | None = None
        ) -> SinceResult:
            await asyncio.sleep(0)
            raise BackendUnavailableError("down")

    down = Down(MemoryBackend(epoch="ep"))
    waiter = LongPollWaiter(down, "t")
    results = await asyncio.gather(
        *(waiter.wait(None, timeout=1) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, BackendUnavailableError) for r in results)
    assert waiter.waiting == 0
    await waiter.close()
