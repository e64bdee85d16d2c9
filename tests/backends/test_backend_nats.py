"""What the NATS JetStream backend adds to the contract: names, URLs, lost streams, errors.

The contract itself runs in ``test_backend_contract.py`` (parameter ``nats``).
These tests use the session's ``nats-server`` (``conftest.nats_url``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from backend_helpers import Recorder
from serverprocs import free_port

from tornado_longconn.backends import backend_from_url
from tornado_longconn.exceptions import BackendUnavailableError, ConnectionClosedError
from tornado_longconn.log import Cursor, HistoryLimit

nats = pytest.importorskip("nats", reason="nats-py is not installed")

from tornado_longconn.backends.nats import NatsBackend, topic_token  # noqa: E402

H = HistoryLimit(max_messages=100)


@pytest.fixture
async def backend(nats_url: str) -> AsyncIterator[NatsBackend]:
    made = NatsBackend(nats_url, prefix=f"n{secrets.token_hex(4)}", storage="memory")
    await made.start()
    try:
        yield made
    finally:
        await made.close()


def test_topic_tokens_are_distinct_and_valid() -> None:
    topics = ["room", "a.b", "a_2Eb", "a b", "ä", "x*>", "-", "A"]
    tokens = [topic_token(t) for t in topics]
    assert len(set(tokens)) == len(topics)
    for token in tokens:
        assert all(c.isalnum() or c in "-_" for c in token), token
    assert topic_token("room") == "room"
    with pytest.raises(ValueError, match="empty"):
        topic_token("")
    with pytest.raises(ValueError, match="too long"):
        topic_token("ü" * 100)


def test_backend_from_url_makes_a_nats_backend() -> None:
    backend = backend_from_url("nats://h1:4222,h2:4223", prefix="p")
    assert isinstance(backend, NatsBackend)
    assert backend.servers == ["nats://h1:4222", "nats://h2:4223"]
    assert backend.prefix == "p"
    assert isinstance(backend_from_url("tls://h:4222"), NatsBackend)
    with pytest.raises(ValueError, match="no NATS server"):
        backend_from_url("nats://")


@pytest.mark.parametrize("prefix", ["", "a.b", "a b", "x" * 33, "a*"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        NatsBackend(prefix=prefix)


def test_bad_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="storage"):
        NatsBackend(storage="disk")


async def test_start_without_a_server_raises_unavailable() -> None:
    backend = NatsBackend(f"nats://127.0.0.1:{free_port()}", connect_timeout=1)
    with pytest.raises(BackendUnavailableError):
        await backend.start()
    await backend.close()
    with pytest.raises(ConnectionClosedError):
        await backend.start()


async def test_a_lost_stream_comes_back_with_a_new_epoch(
    backend: NatsBackend, nats_url: str
) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    old = await backend.publish("t", "before", history=H)
    await rec.wait_messages(1)
    assert old.cursor is not None
    nc = await nats.connect(nats_url)
    await nc.jetstream().delete_stream(f"{backend.prefix}_t")
    await nc.close()
    new = await backend.publish("t", "after", history=H)
    assert new.cursor is not None and new.cursor.epoch != old.cursor.epoch
    assert new.cursor.offset == 1
    await rec.wait_messages(2)
    assert rec.gaps == [("t", "epoch")]
    got = await backend.since("t", old.cursor)
    assert (got.gap, got.reason, got.cursor) == (True, "epoch", new.cursor)


async def test_max_age_is_applied_when_history_is_read(nats_url: str) -> None:
    now = [1_000_000.0]
    backend = NatsBackend(nats_url, prefix=f"n{secrets.token_hex(4)}", clock=lambda: now[0])
    await backend.start()
    try:
        limit = HistoryLimit(max_messages=10, max_age=60)
        first = await backend.publish("t", "old", history=limit)
        assert first.cursor is not None
        start = Cursor(first.cursor.epoch, 0)
        assert [m.data for m in (await backend.since("t", start)).messages] == ["old"]
        now[0] += 61
        got = await backend.since("t", start)
        assert (got.gap, got.reason) == (True, "evicted")
    finally:
        await backend.close()


async def test_stats_count_publishes_and_deliveries(backend: NatsBackend) -> None:
    rec = Recorder()
    await backend.subscribe("t", rec)
    await backend.publish("t", "a", history=H)
    await backend.publish("t", "b")
    await rec.wait_messages(2)
    stats = backend.stats()
    assert (stats.kind, stats.connected, stats.topics, stats.subscribers) == ("nats", True, 1, 1)
    assert (stats.published, stats.received, stats.gaps) == (2, 2, 0)


async def test_limit_zero_reads_everything_as_on_redis(backend: NatsBackend) -> None:
    sent = [await backend.publish("t", f"m{i}", history=H) for i in range(3)]
    assert sent[0].cursor is not None
    got = await backend.since("t", Cursor(sent[0].cursor.epoch, 0), limit=0)
    assert [m.data for m in got.messages] == ["m0", "m1", "m2"]
