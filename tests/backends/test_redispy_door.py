"""Canary for the redis-py names the Redis backend's listener uses (the door's redispy module)."""

from __future__ import annotations

from typing import Any

import pytest

redis = pytest.importorskip("redis")

from backend_helpers import REDIS_URL, redis_reachable  # noqa: E402
from redis.asyncio import Connection, Redis  # noqa: E402

from tornado_longconn._tornado import redispy  # noqa: E402
from tornado_longconn.exceptions import LongConnError  # noqa: E402

pytestmark = pytest.mark.redis


def test_the_installed_redis_py_has_every_name() -> None:
    redispy.check_redispy()


def test_a_renamed_method_fails_loudly_naming_it_and_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def read_response(self: Any, *, timeout: float | None = None) -> Any: ...

    monkeypatch.setattr(Connection, "read_response", read_response)
    with pytest.raises(LongConnError, match=r"read_response\.disconnect_on_error.*redis-py") as err:
        redispy.check_redispy()
    assert redis.__version__ in str(err.value)


async def test_the_listener_connection_subscribes_and_reads_on_a_real_server() -> None:
    if not await redis_reachable():
        pytest.skip("no Redis server")
    client = Redis.from_url(REDIS_URL)
    publisher = Redis.from_url(REDIS_URL)
    conn = redispy.pubsub_connection(client.connection_pool, protocol=2, decode_responses=False)
    try:
        await conn.connect()
        await conn.send_command("SUBSCRIBE", "lc-canary", check_health=False)
        reply = await conn.read_response(timeout=5, disconnect_on_error=False)
        assert reply[0] == b"subscribe" and reply[1] == b"lc-canary"
        await publisher.publish("lc-canary", b"hello")
        message = await conn.read_response(timeout=5, disconnect_on_error=False)
        assert message == [b"message", b"lc-canary", b"hello"]
        # Nothing more: a read past its timeout answers None (what the listener's
        # idle ping relies on) and leaves the connection usable.
        assert await conn.read_response(timeout=0.05, disconnect_on_error=False) is None
        await conn.send_command("PING", check_health=False)
        assert await conn.read_response(timeout=5, disconnect_on_error=False) in (
            [b"pong", b""],
            b"PONG",
        )
    finally:
        await conn.disconnect(nowait=True)
        await client.aclose()
        await publisher.aclose()


def test_resp3_only_arguments_are_dropped() -> None:
    class Pool:
        connection_class = dict
        connection_kwargs: dict[str, Any] = {
            "host": "h",
            "maint_notifications_config": object(),
            "maint_notifications_pool_handler": object(),
        }

    conn: Any = redispy.pubsub_connection(Pool(), protocol=2)
    assert conn == {"host": "h", "protocol": 2}
