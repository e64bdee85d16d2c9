"""Presence on Redis: several stores (processes) against the model, process deaths
reaped exactly once, and the rebuild after Redis restarts empty."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backends.redisproc import RedisProcess
from tests.helpers import REDIS_URL, redis_reachable, require_redis, run_on_suite_loop
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.presence import Member, PresenceEvent, PresenceState, PresenceStats
from tornado_longconn.presence_redis import RedisPresence
from tornado_longconn.testing import scaled

pytest.importorskip("redis.asyncio")

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

TOPICS = ("a", "b")


class Recorder:
    """A watcher that records events and wakes waiters."""

    def __init__(self) -> None:
        self.events: list[PresenceEvent] = []
        self.changed = asyncio.Event()

    def __call__(self, event: PresenceEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), scaled(timeout))


async def make_store(url: str, prefix: str, ttl: float = 30.0) -> RedisPresence:
    backend = RedisBackend(url, prefix=prefix, reconnect_base=0.01, reconnect_cap=0.2)
    await backend.start()
    store = RedisPresence(backend, ttl=ttl)
    await store.start()
    return store


async def crash(store: RedisPresence) -> None:
    """Stop a store as a killed process stops: no leave, no more refresh.

    (The sender is stopped once idle: cancelling a redis-py command while it
    connects leaks the connection, which a killed process would not notice.)
    """
    refresher = store._refresher
    if refresher is not None:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
    await store.settled()
    if store._worker is not None:
        store._worker.cancel()
        await asyncio.gather(store._worker, return_exceptions=True)
    store._worker = store._refresher = None
    store.closed = True
    await store.backend.close()


async def expire(via: RedisPresence, process: str) -> None:
    """Make ``process``'s deadline pass now (as if its TTL ran out), through ``via``'s Redis."""
    client: Any = via.backend.redis
    await client.zadd(via.prefix + "presence:procs", {process: 0})


async def all_members(store: RedisPresence, topic: str) -> set[tuple[str, str | None, str]]:
    found: set[tuple[str, str | None, str]] = set()
    cursor = None
    for _ in range(1000):
        page = await store.presence(topic, cursor=cursor, limit=2)
        found |= {(m.client, m.user, m.process) for m in page.members}
        cursor = page.cursor
        if cursor is None:
            return found
    raise AssertionError("paging did not end")


async def close_stores(stores: list[RedisPresence]) -> None:
    for store in stores:
        await store.close()  # idempotent, as is the backend's
        await store.backend.close()


# ops: ("join", proc, topic, client, user) | ("leave", proc, topic, client) | ("crash", proc)
op_strategy = st.one_of(
    st.tuples(
        st.just("join"),
        st.integers(0, 2),
        st.sampled_from(TOPICS),
        st.sampled_from("cdefg"),
        st.sampled_from([None, "ann", "bob"]),
    ),
    st.tuples(
        st.just("leave"), st.integers(0, 2), st.sampled_from(TOPICS), st.sampled_from("cdefg")
    ),
    st.tuples(st.just("crash"), st.integers(0, 2)),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(op_strategy, max_size=14))
def test_stores_follow_the_model(ops: list[tuple[Any, ...]]) -> None:
    """Joins, leaves and deaths on three stores give the model's members, counts and events."""
    run_on_suite_loop(_check_against_model(ops))


async def _check_against_model(ops: list[tuple[Any, ...]]) -> None:
    if not await redis_reachable():
        pytest.skip("no Redis")
    prefix = f"test:presence:{secrets.token_hex(4)}:"
    stores = [await make_store(REDIS_URL, prefix) for _ in range(3)]
    watcher = await make_store(REDIS_URL, prefix)
    recorder = Recorder()
    try:
        for topic in TOPICS:
            await watcher.watch(topic, recorder)
        model = PresenceState()
        expected: list[PresenceEvent] = []
        dead: set[int] = set()
        for op in ops:
            kind, index = op[0], op[1]
            if index in dead:
                continue
            store = stores[index]
            if kind == "join":
                _, _, topic, client, user = op
                # a client id is one connection: unique across processes, as in the handlers
                client = f"{client}{index}"
                member = Member(client, user, {"n": 1}, 1.0, "websocket", store.process)
                store.join_nowait(topic, member)
                event = model.join(topic, member)
            elif kind == "leave":
                _, _, topic, client = op
                client = f"{client}{index}"
                store.leave_nowait(topic, client)
                event = model.leave(topic, client, store.process)
            else:
                await store.settled()
                await crash(store)
                dead.add(index)
                # the watcher is not dead (its refresh puts it back): it must not lose anyone
                await expire(watcher, watcher.process)
                await expire(watcher, store.process)
                expected.extend(model.expire(store.process))
                # every survivor reaps at once: each member still leaves once
                alive = [s for i, s in enumerate(stores) if i not in dead] + [watcher]
                await asyncio.gather(*(s.refresh() for s in alive))
                event = None
            if event is not None:
                expected.append(event)
            await store.settled()
        for index, store in enumerate(stores):
            if index not in dead:
                await store.settled()
        for topic in TOPICS:
            want = {(m.client, m.user, m.process) for m in model.all_members(topic)}
            assert await all_members(watcher, topic) == want
            assert await watcher.presence_stats(topic) == model.stats(topic)
        # A marker join per topic: events arrive in order, so once the watcher has
        # both markers it has every event before them.
        marker = Member("marker", None, None, 0.0, "websocket", watcher.process)
        for topic in TOPICS:
            watcher.join_nowait(topic, marker)
        await recorder.until(
            lambda: sum(1 for e in recorder.events if e.member and e.member.client == "marker") == 2
        )

        def shape(events: list[PresenceEvent], topic: str) -> list[Any]:
            """The topic's events; the leaves of one death in any order (a set per run)."""
            out: list[Any] = []
            for e in events:
                if e.topic != topic or e.member is None or e.member.client == "marker":
                    continue
                if e.reason == "expired":
                    if not out or not isinstance(out[-1], set):
                        out.append(set())
                    out[-1].add(e.member.client)
                else:
                    out.append((e.kind, e.member.client, e.reason))
            return out

        for topic in TOPICS:
            assert shape(recorder.events, topic) == shape(expected, topic)
    finally:
        await close_stores([*stores, watcher])


@pytest.fixture
async def prefix() -> str:
    await require_redis()
    return f"test:presence:{secrets.token_hex(4)}:"


async def test_dead_process_members_leave_within_the_ttl(prefix: str) -> None:
    """A process that stops refreshing: its members leave once, in ttl + refresh_interval."""
    ttl = scaled(0.6)
    alive = await make_store(REDIS_URL, prefix, ttl)
    doomed = await make_store(REDIS_URL, prefix, ttl)
    recorder = Recorder()
    try:
        await alive.watch("room", recorder)
        alive.join_nowait("room", Member("a", "ann"))
        doomed.join_nowait("room", Member("d1", "dan"))
        doomed.join_nowait("room", Member("d2", "dan"))
        await doomed.settled()
        await alive.settled()
        assert await alive.presence_stats("room") == PresenceStats(3, 2)
        await crash(doomed)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await recorder.until(
            lambda: sum(1 for e in recorder.events if e.kind == "leave") == 2,
            timeout=ttl + ttl / 3 + 1.0,
        )
        leaves = [e for e in recorder.events if e.kind == "leave"]
        assert {e.member.client for e in leaves if e.member} == {"d1", "d2"}
        assert {e.reason for e in leaves} == {"expired"}
        assert loop.time() - start < ttl + ttl / 3 + scaled(1.0)
        assert await alive.presence_stats("room") == PresenceStats(1, 1)
        # a reap after the reap removes nothing more
        await alive.refresh()
        assert alive.counts["reaped"] == 2
    finally:
        await close_stores([alive, doomed])


async def test_close_removes_members_at_once(prefix: str) -> None:
    one = await make_store(REDIS_URL, prefix)
    two = await make_store(REDIS_URL, prefix)
    recorder = Recorder()
    try:
        await one.watch("room", recorder)
        two.join_nowait("room", Member("x", "xi"))
        await recorder.until(lambda: len(recorder.events) == 1)
        await two.close()
        await recorder.until(lambda: len(recorder.events) == 2)
        assert (recorder.events[1].kind, recorder.events[1].reason) == ("leave", "left")
        assert await one.presence_stats("room") == PresenceStats(0, 0)
        client: Any = one.backend.redis
        assert await client.zscore(prefix + "presence:procs", two.process) is None
    finally:
        await close_stores([one, two])


async def test_redis_restart_rebuilds_without_phantoms() -> None:
    """Redis restarts empty: the live process's refresh reports its members again;
    a process that died meanwhile does not come back."""
    redis = RedisProcess()
    await redis.start()
    prefix = "test:presence:restart:"
    live = await make_store(redis.url, prefix)
    dead = await make_store(redis.url, prefix)
    recorder = Recorder()
    try:
        await live.watch("room", recorder)
        live.join_nowait("room", Member("a", "ann"))
        live.join_nowait("room", Member("b", "bob"))
        dead.join_nowait("room", Member("z", "zed"))
        await live.settled()
        await dead.settled()
        assert await live.presence_stats("room") == PresenceStats(3, 3)
        await crash(dead)
        await redis.restart()
        # Refresh until Redis answers again (each refresh is one attempt).
        for _ in range(50):
            await live.refresh()
            if live.counts["rebuilds"] >= 1 and not live._dirty:
                break
            await asyncio.sleep(scaled(0.05))  # a retry deadline: Redis is coming back
        assert await live.presence_stats("room") == PresenceStats(2, 2)
        assert {m[0] for m in await all_members(live, "room")} == {"a", "b"}
        # the watcher was told events may be missing, then saw the members come back
        await recorder.until(
            lambda: (
                {e.member.client for e in recorder.events if e.kind == "join" and e.member}
                >= {"a", "b"}
                and any(e.kind == "gap" for e in recorder.events)
            )
        )
    finally:
        await close_stores([live, dead])
        await redis.close()


async def test_info_that_is_not_json_does_not_stop_the_sender(prefix: str) -> None:
    store = await make_store(REDIS_URL, prefix)
    try:
        store.join_nowait("room", Member("a", "ann", {"bad": {1, 2}}))
        store.join_nowait("room", Member("b", "bob", {"ok": 1}))
        await store.settled()
        found = {m.client: m.info for m in (await store.presence("room")).members}
        assert found == {"a": None, "b": {"ok": 1}}
    finally:
        await close_stores([store])


async def test_names_with_a_newline_are_refused(prefix: str) -> None:
    store = await make_store(REDIS_URL, prefix)
    try:
        assert not store.join_nowait("user#a\nb", Member("c1", "a\nb"))
        assert not store.join_nowait("room", Member("c\n2"))
        assert store.join_nowait("room", Member("c3", "a\nb"))  # a user id may hold one
        await store.settled()
        assert await store.presence_stats("room") == PresenceStats(1, 1)
    finally:
        await close_stores([store])


async def test_members_reported_before_start_are_stored_by_the_first_refresh(
    prefix: str,
) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    await backend.start()
    store = RedisPresence(backend)
    try:
        assert store.join_nowait("room", Member("early", "ann"))  # nothing queued yet
        assert store.counts["dropped"] == 1
        await store.start()  # its first refresh finds Redis short of one and rebuilds
        assert await store.presence_stats("room") == PresenceStats(1, 1)
        assert store.counts["rebuilds"] == 1
    finally:
        await close_stores([store])
