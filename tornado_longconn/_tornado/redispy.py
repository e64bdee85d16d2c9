"""The redis-py side of the door: a raw pub/sub connection built from a client's pool.

:class:`~tornado_longconn.backends.redis.RedisBackend` listens on ONE connection
of its own, which it reconnects itself (no hidden retries) and reads with its own
timeouts. redis-py has no public API for that, so this module builds it from the
pool's construction arguments and drives it with the connection's low-level
methods. Every name it relies on is listed here, typed, and checked when the
Redis backend is imported (:func:`check_redispy`); ``tests/test_tornado_canary.py``
checks their behaviour on a real server. Checked against redis-py 5.0.8 and 8.2.0.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, cast

from ..exceptions import LongConnError

__all__ = ["CHECKED_REDIS_VERSIONS", "RawConnection", "check_redispy", "pubsub_connection"]

#: redis-py versions these names were checked against (source read, tests run).
CHECKED_REDIS_VERSIONS: tuple[str, ...] = ("5.0.8", "8.2.0")

# Construction arguments that only a RESP3 connection with maintenance push
# notifications understands (redis-py >= 6.x); the listener is RESP2.
_RESP3_ONLY_KWARGS = ("maint_notifications_config", "maint_notifications_pool_handler")


class RawConnection(Protocol):
    """The methods of ``redis.asyncio.Connection`` the backend's listener calls."""

    # checked against redis-py 5.0.8, 8.2.0: connect() -> None
    async def connect(self) -> None: ...

    # checked against redis-py 5.0.8, 8.2.0: send_command(*args, check_health=bool)
    async def send_command(self, *args: Any, **kwargs: Any) -> None: ...

    # checked against redis-py 5.0.8, 8.2.0: read_response(timeout=, disconnect_on_error=)
    async def read_response(self, *, timeout: float | None, disconnect_on_error: bool) -> Any: ...

    # checked against redis-py 5.0.8, 8.2.0: disconnect(nowait=bool)
    async def disconnect(self, nowait: bool = False) -> None: ...


class _Pool(Protocol):
    # checked against redis-py 5.0.8, 8.2.0: public attributes, undocumented
    connection_kwargs: dict[str, Any]
    connection_class: type[Any]


def _missing(owner: str, name: str) -> LongConnError:
    import redis

    return LongConnError(
        f"{owner}.{name} is missing or changed in redis-py {redis.__version__} "
        f"(tornado-longconn was checked against redis-py {', '.join(CHECKED_REDIS_VERSIONS)})"
    )


def check_redispy() -> None:
    """Raise :class:`LongConnError` unless redis-py has every name this module uses."""
    from redis.asyncio import Connection, ConnectionPool

    pool_init = inspect.signature(ConnectionPool.__init__).parameters
    if "connection_class" not in pool_init:
        raise _missing("redis.asyncio.ConnectionPool", "connection_class")
    if "connection_kwargs" not in ConnectionPool.__init__.__code__.co_names:
        raise _missing("redis.asyncio.ConnectionPool", "connection_kwargs")
    wanted = {
        "connect": (),
        "send_command": ("check_health",),
        "read_response": ("timeout", "disconnect_on_error"),
        "disconnect": ("nowait",),
    }
    for method, params in wanted.items():
        func = getattr(Connection, method, None)
        if func is None:
            raise _missing("redis.asyncio.Connection", method)
        signature = inspect.signature(func).parameters
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.values())
        for param in params:
            if param not in signature and not (accepts_kwargs and method == "send_command"):
                raise _missing(f"redis.asyncio.Connection.{method}", param)


def pubsub_connection(pool: object, **overrides: Any) -> RawConnection:
    """A new, unconnected connection made like ``pool``'s, with ``overrides`` applied.

    The RESP3-only maintenance-notification arguments of newer redis-py are
    dropped: the listener speaks RESP2.
    """
    typed = cast(_Pool, pool)
    kwargs = dict(typed.connection_kwargs)
    kwargs.update(overrides)
    for name in _RESP3_ONLY_KWARGS:
        kwargs.pop(name, None)
    return cast(RawConnection, typed.connection_class(**kwargs))
