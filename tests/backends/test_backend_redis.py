"""Redis-specific behaviour of ``RedisBackend``: encoding, backoff, keys, failures.

The I/O-free parts (payload encoding, backoff) are tested without Redis. Tests
that stop or restart Redis run their own ``redis-server`` (see ``redisproc.py``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from backend_helpers import REDIS_URL, Recorder, require_redis
from hypothesis import given
from hypothesis import strategies as st
from redisproc import RedisProcess

from tornado_longconn.backends import MemoryBackend, backend_from_url
from tornado_longconn.exceptions import BackendUnavailableError, ConnectionClosedError
from tornado_longconn.log import Cursor, HistoryLimit
from tornado_longconn.testing import scaled

redis_mod = pytest.importorskip("tornado_longconn.backends.redis")
aioredis = pytest.importorskip("redis.asyncio")
RedisBackend = redis_mod.RedisBackend
ReconnectBackoff = redis_mod.ReconnectBackoff

H = HistoryLimit(max_messages=100)

# -- I/O-free parts -----------------------------------------------------------------


def frame(epoch: str, seq: int, offset: int, tail: bytes) -> bytes:
    """What the publish script sends (mirrors the Lua concatenation)."""
    return b"1:%s:%d:%d:%s" % (epoch.encode(), seq, offset, tail)


@given(
    data=st.one_of(st.text(), st.binary()),
    tag=st.one_of(st.none(), st.text()),
    time_s=st.floats(min_value=0, max_value=4e9),
    seq=st.integers(min_value=1, max_value=2**62),
    offset=st.integers(min_value=0, max_value=2**62),
    epoch=st.text("0123456789abcdef", min_size=1, max_size=32),
)
def test_payload_round_trip(
    data: str | bytes, tag: str | None, time_s: float, seq: int, offset: int, epoch: str
) -> None:
    payload = frame(epoch, seq, offset, redis_mod.encode_tail(data, tag, time_s))
    got = redis_mod.decode_payload(payload)
    assert got[:3] == (epoch, seq, offset)
    assert type(got[3]) is type(data) and got[3] == data
    assert got[4] == tag
    assert got[5] == pytest.approx(time_s, abs=1e-6)


@pytest.mark.parametrize(
    "payload", [b"", b"2:e:1:1:t0::x", b"1:e:1:1:x0::x", b"1:e:x:1:t0::", b"1:e:1:1:t0:9:ab"]
)
def test_malformed_payloads_are_refused(payload: bytes) -> None:
    # The last one has a tag length beyond the end: it decodes a short tag, so check
    # that whatever decodes, it never silently invents data.
    try:
        got = redis_mod.decode_payload(payload)
    except ValueError:
        return
    assert got[3] == b"" or got[3] == ""


def test_encode_tail_refuses_other_types() -> None:
    with pytest.raises(TypeError):
        redis_mod.encode_tail(1, None, 0.0)


@given(
    base=st.floats(min_value=0.001, max_value=1),
    cap=st.floats(min_value=1, max_value=60),
    rolls=st.lists(st.floats(min_value=0, max_value=0.999999), min_size=1, max_size=80),
)
def test_backoff_is_bounded_and_grows(base: float, cap: float, rolls: list[float]) -> None:
    backoff = ReconnectBackoff(base, cap)
    ceilings = []
    for roll in rolls:
        ceiling = backoff.ceiling()
        delay = backoff.next_delay(lambda roll=roll: roll)
        assert 0 <= delay <= ceiling <= cap
        ceilings.append(ceiling)
    assert ceilings == sorted(ceilings)
    assert ceilings[0] == base
    backoff.reset()
    assert backoff.ceiling() == base


def test_backoff_reaches_the_cap() -> None:
    backoff = ReconnectBackoff(0.05, 5.0)
    for _ in range(20):
        backoff.next_delay()
    assert backoff.ceiling() == 5.0
    with pytest.raises(ValueError, match="base"):
        ReconnectBackoff(0, 1)
    with pytest.raises(ValueError, match="base"):
        ReconnectBackoff(2, 1)


def test_backend_from_url() -> None:
    assert isinstance(backend_from_url("memory://"), MemoryBackend)
    backend = backend_from_url("redis://127.0.0.1:1/0", prefix="p:")
    assert isinstance(backend, RedisBackend)
    assert backend.prefix == "p:"
    assert isinstance(backend_from_url("rediss://example.invalid:6380/0"), RedisBackend)
    assert isinstance(backend_from_url("unix:///tmp/redis.sock"), RedisBackend)
    for bad in ("kafka://x", "127.0.0.1:6379", ""):
        with pytest.raises(ValueError, match="URL"):
            backend_from_url(bad)
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisBackend("http://x")
    with pytest.raises(ValueError, match="prefix"):
        RedisBackend(REDIS_URL, prefix="a{b}")
    with pytest.raises(ValueError, match="max_connections"):
        RedisBackend(REDIS_URL, max_connections=0)


# -- against the shared Redis ---------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    await require_redis()
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


@pytest.fixture
async def prefix(client: Any) -> AsyncIterator[str]:
    p = f"test:{secrets.token_hex(6)}:"
    yield p
    keys = [k async for k in client.scan_iter(match=p + "*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def backend(prefix: str) -> AsyncIterator[Any]:
    b = RedisBackend(REDIS_URL, prefix=prefix)
    await b.start()
    yield b
    await b.close()


@pytest.mark.redis
async def test_more_concurrent_commands_than_connections_wait_for_one(prefix: str) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix, max_connections=4)
    await backend.start()
    try:
        for i in range(3):
            await backend.publish("t", f"m{i}", history=H)
        results = await asyncio.gather(
            *(backend.since("t", None) for _ in range(150)),
            *(backend.publish("t", "more", history=H) for _ in range(50)),
        )
        assert all(r.cursor.offset >= 3 for r in results)
        head = await backend.head("t")
        assert head.offset == 53
    finally:
        await backend.close()


@pytest.mark.redis
async def test_a_command_queued_for_the_pool_outwaits_the_command_timeout(prefix: str) -> None:
    # The pool's only connection is held past command_timeout: a queued command waits
    # for it (pool_timeout), then runs; with pool_timeout shorter it fails unavailable.
    command_timeout = scaled(0.2)
    backend = RedisBackend(
        REDIS_URL,
        prefix=prefix,
        max_connections=1,
        command_timeout=command_timeout,
        pool_timeout=scaled(30),
    )
    impatient = RedisBackend(
        REDIS_URL, prefix=prefix, max_connections=1, pool_timeout=command_timeout
    )
    try:
        for b in (backend, impatient):
            await b.publish("t", "m", history=H)
            pool = b._client.connection_pool
            try:
                held = await pool.get_connection()
            except TypeError:  # redis-py < 5.3 needs a command name
                held = await pool.get_connection("PING")
            queued = asyncio.ensure_future(b.head("t"))
            done, _ = await asyncio.wait([queued], timeout=3 * command_timeout)
            if b is impatient:
                assert done and isinstance(queued.exception(), BackendUnavailableError)
                await pool.release(held)
                continue
            assert not done  # still waiting for the pool, not failed at command_timeout
            await pool.release(held)
            assert (await queued).offset == 1
    finally:
        await backend.close()
        await impatient.close()
    with pytest.raises(ValueError, match="pool_timeout"):
        RedisBackend(REDIS_URL, pool_timeout=0)


@pytest.mark.redis
async def test_a_publish_is_not_queued_behind_a_storm_of_history_reads(prefix: str) -> None:
    # Two connections: the reads hold at most one, so a publish sent after 200 reads
    # gets the other one and completes long before the reads do (FIFO on one pool
    # would put it behind every read).
    backend = RedisBackend(REDIS_URL, prefix=prefix, max_connections=2)
    try:
        await backend.publish("t", "m", history=H)
        order: list[str] = []

        async def read() -> None:
            await backend.since("t", None)
            order.append("read")

        async def publish() -> None:
            await backend.publish("t", "live", history=H)
            order.append("publish")

        reads = [asyncio.ensure_future(read()) for _ in range(200)]  # these run first
        await asyncio.gather(*reads, asyncio.ensure_future(publish()))
        assert len(order) == 201
        assert order.index("publish") < 100, order.index("publish")
    finally:
        await backend.close()


@pytest.mark.redis
async def test_one_pubsub_subscription_per_topic_per_process(backend: Any, client: Any) -> None:
    recs = [Recorder(f"r{i}") for i in range(3)]
    for topic in ("a", "b"):
        for rec in recs:
            await backend.subscribe(topic, rec)
    chans = [backend._channel(t) for t in ("a", "b")]
    assert dict(await client.pubsub_numsub(*chans)) == dict.fromkeys(chans, 1)
    for rec in recs[:2]:
        await backend.unsubscribe("a", rec)
    assert dict(await client.pubsub_numsub(chans[0])) == {chans[0]: 1}
    await backend.unsubscribe("a", recs[2])
    # The UNSUBSCRIBE is not awaited; a later SUBSCRIBE on the same connection is
    # confirmed after it, so once that returns, Redis has processed both.
    await backend.subscribe("c", recs[0])
    assert dict(await client.pubsub_numsub(chans[0])) == {chans[0]: 0}
    assert backend.stats().topics == 2


@pytest.mark.redis
async def test_keys_share_the_topic_hash_tag(backend: Any, client: Any, prefix: str) -> None:
    await backend.publish("room:1", "x", history=H)
    keys = sorted([k.decode() async for k in client.scan_iter(match=prefix + "*")])
    assert keys == [prefix + "{room:1}:h", prefix + "{room:1}:m"]


@pytest.mark.redis
async def test_publish_is_one_round_trip(backend: Any, client: Any) -> None:
    await backend.publish("t", "warm up", history=H)  # loads the script
    before = await client.info("commandstats")
    await backend.publish("t", "x", history=H)
    after = await client.info("commandstats")

    def calls(stats: dict[str, Any], name: str) -> int:
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

    assert calls(after, "evalsha") - calls(before, "evalsha") == 1
    assert calls(after, "eval") == calls(before, "eval")
    assert calls(after, "publish") - calls(before, "publish") == 1


@pytest.mark.redis
async def test_script_cache_flush_falls_back_to_eval(backend: Any, client: Any) -> None:
    await backend.publish("t", "a", history=H)
    await client.script_flush()
    sent = await backend.publish("t", "b", history=H)
    assert sent.cursor.offset == 2


@pytest.mark.redis
async def test_lost_topic_keys_make_a_new_epoch(backend: Any, client: Any, prefix: str) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    old = await backend.publish("t", "before", history=H)
    await client.delete(prefix + "{t}:m")  # as if Redis evicted or lost it
    new = await backend.publish("t", "after", history=H)
    assert new.cursor.epoch != old.cursor.epoch
    assert new.cursor.offset == 1
    got = await backend.since("t", old.cursor)
    assert (got.gap, got.reason, got.cursor) == (True, "epoch", new.cursor)
    await rec.wait_messages(2)
    assert rec.gaps == [("t", "epoch")]


@pytest.mark.redis
async def test_lost_history_stream_is_an_evicted_gap(
    backend: Any, client: Any, prefix: str
) -> None:
    first = await backend.publish("t", "a", history=H)
    await backend.publish("t", "b", history=H)
    await client.delete(prefix + "{t}:h")
    got = await backend.since("t", first.cursor)
    assert (got.gap, got.reason) == (True, "evicted")


@pytest.mark.redis
async def test_a_skipped_sequence_number_is_a_gap(backend: Any, client: Any, prefix: str) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    await backend.publish("t", "1")
    await rec.wait_messages(1)
    await client.hincrby(prefix + "{t}:m", "n", 3)  # three messages that never arrived
    await backend.publish("t", "5")
    await rec.wait_messages(2)
    assert rec.gaps == [("t", "lost")]
    assert rec.data == ["1", "5"]
    assert backend.stats().gaps == 1


@pytest.mark.redis
async def test_undecodable_payload_is_a_gap(backend: Any, client: Any) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    await client.publish(backend._channel("t"), b"garbage")
    await backend.publish("t", "fine")
    await rec.wait_messages(1)
    assert rec.gaps == [("t", "lost")]
    assert rec.data == ["fine"]
    assert backend.stats().decode_errors == 1


@pytest.mark.redis
async def test_max_age_is_applied_when_history_is_read(prefix: str) -> None:
    now = [1000.0]
    backend = RedisBackend(REDIS_URL, prefix=prefix, clock=lambda: now[0])
    try:
        limit = HistoryLimit(max_messages=100, max_age=10)
        first = await backend.publish("t", "old", history=limit)
        now[0] += 8
        second = await backend.publish("t", "newer", history=limit)
        now[0] += 5  # "old" is 13 s old now, "newer" 5 s
        got = await backend.since("t", Cursor(first.cursor.epoch, 0))
        assert (got.gap, got.reason) == (True, "evicted")
        kept = await backend.since("t", first.cursor)
        assert [m.cursor for m in kept.messages] == [second.cursor]
    finally:
        await backend.close()


@pytest.mark.redis
async def test_a_client_object_with_decoding_on_works(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    backend = RedisBackend(client, prefix=prefix)
    try:
        rec = Recorder()
        await backend.subscribe("t", rec)
        sent = await backend.publish("t", b"\xff\x00", history=H)
        await rec.wait_messages(1)
        assert rec.data == [b"\xff\x00"]
        got = await backend.since("t", Cursor(sent.cursor.epoch, 0))
        assert [m.data for m in got.messages] == [b"\xff\x00"]
    finally:
        await backend.close()
    assert await client.ping()  # the backend does not close a client it was given
    await client.aclose()


@pytest.mark.redis
async def test_close_cancels_every_task(prefix: str) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    await backend.subscribe("t", Recorder())
    assert backend.connected
    ours = {t for t in asyncio.all_tasks() if "RedisBackend" in t.get_name()}
    assert len(ours) == 1
    await backend.close()
    assert all(t.done() for t in ours)
    assert not backend.connected
    with pytest.raises(ConnectionClosedError):
        await backend.subscribe("t", Recorder())
    with pytest.raises(ConnectionClosedError):
        await backend.since("t", None)


# -- with a private redis-server that the test stops and restarts ---------------------


@pytest.fixture
async def server() -> AsyncIterator[RedisProcess]:
    await require_redis()
    proc = RedisProcess()
    await proc.start()
    try:
        yield proc
    finally:
        await proc.close()


def fast_backend(url: str) -> Any:
    return RedisBackend(
        url,
        prefix="t:",
        reconnect_base=scaled(0.01),
        reconnect_cap=scaled(0.2),
        connect_timeout=scaled(1),
        command_timeout=scaled(2),
    )


@pytest.mark.redis
@pytest.mark.slow
async def test_redis_restart_reconnects_and_tells_subscribers(server: RedisProcess) -> None:
    backend, publisher = fast_backend(server.url), fast_backend(server.url)
    rec, other = Recorder("rec"), Recorder("other")
    try:
        await backend.subscribe("t", rec)
        await backend.subscribe("u", other)
        old = await publisher.publish("t", "before", history=H)
        await rec.wait_messages(1)
        await server.restart()
        # Both topics learn that messages may have been missed, once the new
        # subscription is confirmed; then delivery continues.
        await rec.wait_gaps(1, timeout=10)
        await other.wait_gaps(1, timeout=10)
        assert rec.gaps == [("t", "reconnect")]
        assert other.gaps == [("u", "reconnect")]
        new = await publisher.publish("t", "after", history=H)
        await rec.wait_messages(2)
        assert rec.data == ["before", "after"]
        # Redis lost everything (no persistence): the old cursor is from another epoch.
        assert new.cursor.epoch != old.cursor.epoch
        got = await backend.since("t", old.cursor)
        assert (got.gap, got.reason, got.cursor) == (True, "epoch", new.cursor)
        assert backend.stats().reconnects == 1
    finally:
        await backend.close()
        await publisher.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_publish_while_redis_is_down_raises_then_recovers(server: RedisProcess) -> None:
    backend = fast_backend(server.url)
    rec = Recorder()
    try:
        await backend.subscribe("t", rec)
        await server.stop()
        with pytest.raises(BackendUnavailableError):
            await backend.publish("t", "lost", history=H)
        with pytest.raises(BackendUnavailableError):
            await backend.since("t", None)
        # Subscribing while Redis is down does not wait for it; delivery starts
        # when it is back, announced by on_gap.
        late = Recorder("late")
        await asyncio.wait_for(backend.subscribe("late", late), scaled(1))
        await server.start()
        await rec.wait_gaps(1, timeout=10)
        await late.wait_gaps(1, timeout=10)
        assert late.gaps == [("late", "reconnect")]
        await backend.publish("t", "back", history=H)
        await backend.publish("late", "hello", history=H)
        await rec.wait_messages(1)
        await late.wait_messages(1)
        assert rec.data == ["back"] and late.data == ["hello"]
    finally:
        await backend.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_start_with_redis_down_keeps_trying(server: RedisProcess) -> None:
    await server.stop()
    backend = fast_backend(server.url)
    try:
        await asyncio.wait_for(backend.start(), scaled(5))
        assert not backend.connected
        rec = Recorder()
        await backend.subscribe("t", rec)
        await server.start()
        await rec.wait_gaps(1, timeout=10)
        await backend.publish("t", "x")
        await rec.wait_messages(1)
    finally:
        await backend.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_killed_pubsub_connection_is_noticed(server: RedisProcess) -> None:
    backend = fast_backend(server.url)
    admin = aioredis.Redis.from_url(server.url)
    rec = Recorder()
    try:
        await backend.subscribe("t", rec)
        await backend.publish("t", "one")
        await rec.wait_messages(1)
        killed = await admin.client_kill_filter(_type="pubsub")
        assert killed == 1
        await rec.wait_gaps(1, timeout=10)
        assert rec.gaps == [("t", "reconnect")]
        await backend.publish("t", "two")
        await rec.wait_messages(2)
        assert rec.data == ["one", "two"]
    finally:
        await backend.close()
        await admin.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_output_buffer_limit_disconnect_is_a_gap(server: RedisProcess) -> None:
    """Redis drops a subscriber that falls behind; the backend reconnects and says so."""
    admin = aioredis.Redis.from_url(server.url)
    await admin.config_set("client-output-buffer-limit", "pubsub 64kb 0 0")
    backend = fast_backend(server.url)
    rec = Recorder()
    try:
        await backend.subscribe("t", rec)
        await backend.publish("t", "before")
        await rec.wait_messages(1)
        # One script publishes 2 MB at once: the subscriber's output buffer passes
        # 64 kB before Redis can write any of it, and Redis closes the connection.
        flood = "for i = 1, 200 do redis.call('PUBLISH', KEYS[1], ARGV[1]) end"
        await admin.eval(flood, 1, backend._channel("t"), "x" * 10_000)
        await rec.wait_until(lambda: ("t", "reconnect") in rec.gaps, timeout=10)
        await backend.publish("t", "after")
        await rec.wait_until(lambda: rec.data[-1:] == ["after"])
    finally:
        await backend.close()
        await admin.aclose()


@pytest.mark.redis
async def test_ping_detects_a_silent_connection(server: RedisProcess) -> None:
    """A pub/sub connection that stops answering is dropped after ping_timeout."""
    backend = RedisBackend(
        server.url,
        prefix="t:",
        ping_interval=scaled(0.05),
        ping_timeout=scaled(0.1),
        reconnect_base=scaled(0.01),
        reconnect_cap=scaled(0.05),
    )
    admin = aioredis.Redis.from_url(server.url)
    rec = Recorder()
    try:
        await backend.subscribe("t", rec)
        # CLIENT PAUSE holds every reply (including PONG) for the pause.
        await admin.execute_command("CLIENT", "PAUSE", int(scaled(600)), "ALL")
        await rec.wait_gaps(1, timeout=10)
        assert rec.gaps == [("t", "reconnect")]
    finally:
        await backend.close()
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()


@pytest.mark.redis
async def test_subscribe_confirmations_are_matched_per_channel(prefix: str) -> None:
    """A SUBSCRIBE confirmed after its topic was left never stands in for a later one."""
    backend = RedisBackend(REDIS_URL, prefix=prefix, command_timeout=3600)
    try:
        await backend.start()
        a, b = Recorder("a"), Recorder("b")
        await asyncio.gather(backend.subscribe("t", a), backend.unsubscribe("t", a))
        await backend.subscribe("other", Recorder())  # confirmed after the two above
        # Returns when Redis confirms THIS subscription (not after command_timeout).
        await asyncio.wait_for(backend.subscribe("t", b), scaled(5))
        await backend.publish("t", "x")
        await b.wait_messages(1)
        assert (a.data, b.data, b.gaps) == ([], ["x"], [])
    finally:
        await backend.close()
