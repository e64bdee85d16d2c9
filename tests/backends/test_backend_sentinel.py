"""What the Sentinel variant of the Redis backend adds: its URL, and a new epoch per master.

The contract runs in ``test_backend_contract.py`` (parameter ``sentinel``) and
the failover under load in ``test_backend_faults.py``.
"""

from __future__ import annotations

import pytest
from backend_helpers import Recorder

pytest.importorskip("redis.asyncio", reason="the redis package is not installed")

from serverprocs import SentinelSet

from tornado_longconn.backends import backend_from_url
from tornado_longconn.backends.redis_sentinel import (
    SentinelRedisBackend,
    parse_sentinel_url,
)
from tornado_longconn.log import HistoryLimit


def test_parse_sentinel_url() -> None:
    assert parse_sentinel_url("redis+sentinel://a:1,b:2/svc/3") == (
        [("a", 1), ("b", 2)], "svc", 3, None,
    )  # fmt: skip
    assert parse_sentinel_url("redis+sentinel://:p%40ss@a/svc") == (
        [("a", 26379)],
        "svc",
        0,
        "p@ss",
    )
    for bad, match in [
        ("redis://a:1/svc", "redis\\+sentinel"),
        ("redis+sentinel:///svc", "no sentinel"),
        ("redis+sentinel://a:1", "no service"),
        ("redis+sentinel://a:x/svc", "bad sentinel address"),
        ("redis+sentinel://a:1/svc/x", "db must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_sentinel_url(bad)


def test_backend_from_url_makes_a_sentinel_backend() -> None:
    backend = backend_from_url("redis+sentinel://127.0.0.1:1/svc", prefix="p:")
    assert isinstance(backend, SentinelRedisBackend)
    assert (backend.service, backend.prefix) == ("svc", "p:")


async def test_a_master_with_another_replication_id_starts_a_new_epoch(
    sentinel_set: SentinelSet,
) -> None:
    """What a promoted replica looks like to a topic: the history is not trusted."""
    import redis.asyncio

    backend = SentinelRedisBackend(sentinel_set.url, prefix="replid:")
    client = redis.asyncio.Redis(port=sentinel_set.master.port)
    try:
        rec = Recorder()
        await backend.subscribe("t", rec)
        first = await backend.publish("t", "a", history=HistoryLimit())
        assert first.cursor is not None
        # As if the data had been replicated from a master with another ID.
        await client.hset("replid:{t}:m", "r", "0" * 40)
        second = await backend.publish("t", "b", history=HistoryLimit())
        assert second.cursor is not None
        assert second.cursor.epoch != first.cursor.epoch and second.cursor.offset == 1
        await rec.wait_messages(2)
        assert rec.gaps == [("t", "epoch")]
        got = await backend.since("t", first.cursor)
        assert (got.gap, got.reason) == (True, "epoch")
    finally:
        await backend.close()
        await client.delete("replid:{t}:m", "replid:{t}:h")
        await client.aclose()
