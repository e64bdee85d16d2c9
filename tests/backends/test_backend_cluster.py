"""What the Redis Cluster variant adds: its URL, one slot per topic, sharded pub/sub.

The contract runs in ``test_backend_contract.py`` (parameter ``cluster``) and a
master kill under load in ``test_backend_faults.py``.
"""

from __future__ import annotations

import pytest
from backend_helpers import Recorder

pytest.importorskip("redis.asyncio.cluster", reason="the redis package is not installed")

from redis.crc import key_slot
from serverprocs import RedisCluster

from tornado_longconn.backends import backend_from_url
from tornado_longconn.backends.redis_cluster import (
    _CLUSTER_PUBLISH_LUA,
    ClusterRedisBackend,
    parse_cluster_url,
)
from tornado_longconn.log import HistoryLimit


def test_parse_cluster_url() -> None:
    assert parse_cluster_url("redis+cluster://a:1,b") == ([("a", 1), ("b", 6379)], None)
    assert parse_cluster_url("redis+cluster://:pw@a:1/") == ([("a", 1)], "pw")
    for bad, match in [
        ("redis://a:1", "redis\\+cluster"),
        ("redis+cluster://", "no cluster node"),
        ("redis+cluster://a:x", "bad node address"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_cluster_url(bad)


def test_backend_from_url_makes_a_cluster_backend() -> None:
    backend = backend_from_url("redis+cluster://127.0.0.1:1,127.0.0.1:2", prefix="p:")
    assert isinstance(backend, ClusterRedisBackend)
    assert backend.prefix == "p:"


def test_a_topic_keys_and_channel_share_one_slot() -> None:
    backend = ClusterRedisBackend("redis+cluster://127.0.0.1:1", prefix="p:")
    meta, hist = backend._keys("room:42")
    slots = {
        key_slot(meta.encode()),
        key_slot(hist.encode()),
        key_slot(backend._channel("room:42")),
    }
    assert len(slots) == 1
    assert "SPUBLISH" in _CLUSTER_PUBLISH_LUA and "'PUBLISH'" not in _CLUSTER_PUBLISH_LUA


async def test_topics_on_every_shard_are_delivered(redis_cluster: RedisCluster) -> None:
    """Topics whose slots live on different masters: one pub/sub connection per master."""
    backend = ClusterRedisBackend(redis_cluster.url, prefix="shards:")
    try:
        topics = [f"t{i}" for i in range(12)]
        recs = {topic: Recorder(topic) for topic in topics}
        for topic in topics:
            await backend.subscribe(topic, recs[topic])
        for topic in topics:
            await backend.publish(topic, f"to {topic}", history=HistoryLimit())
        for topic in topics:
            await recs[topic].wait_messages(1)
            assert recs[topic].data == [f"to {topic}"] and recs[topic].gaps == []
        assert len(backend._shards) == 3  # every master holds some of the topics
        assert backend.connected
    finally:
        await backend.close()
