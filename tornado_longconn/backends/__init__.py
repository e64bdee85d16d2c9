"""Backends carry messages between processes and keep history.

:class:`MemoryBackend` (default, one process), :class:`RedisBackend` (many
processes and hosts, ``pip install tornado-longconn[redis]``) and
:class:`NatsBackend` (NATS JetStream, ``pip install tornado-longconn[nats]``)
implement :class:`Backend`. :func:`backend_from_url` picks one from a URL.

``RedisBackend`` and ``NatsBackend`` are imported on first use, so this package
imports without the ``redis`` or ``nats-py`` package installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, BackendStats, Subscriber
from .memory import MemoryBackend

if TYPE_CHECKING:
    from .nats import NatsBackend
    from .redis import RedisBackend

__all__ = [
    "Backend",
    "BackendStats",
    "MemoryBackend",
    "NatsBackend",
    "RedisBackend",
    "Subscriber",
    "backend_from_url",
]

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def backend_from_url(url: str, **kwargs: Any) -> Backend:
    """Make the backend a URL names.

    * ``memory://`` -- a :class:`MemoryBackend` (``kwargs`` go to it).
    * ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock`` --
      a :class:`RedisBackend` for that server (``kwargs`` go to it, e.g.
      ``prefix=``). ``redis`` is imported only here.
    * ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` -- a
      :class:`~tornado_longconn.backends.redis_sentinel.SentinelRedisBackend` on
      the master the sentinels name for ``service``.
    * ``redis+cluster://[:password@]host:port[,host:port...]`` -- a
      :class:`~tornado_longconn.backends.redis_cluster.ClusterRedisBackend` on
      that Redis Cluster (sharded pub/sub).
    * ``nats://host:port`` (several servers: ``nats://h1:4222,h2:4222``;
      ``tls://`` for TLS) -- a :class:`NatsBackend` (``kwargs`` go to it, e.g.
      ``prefix=``, ``storage=``). ``nats-py`` is imported only here.

    Raises :class:`ValueError` for another scheme and :class:`ImportError` (with
    the install hint) when the backend's package is not installed.
    Call ``await backend.start()`` next, and ``await backend.close()`` at shutdown.
    """
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"not a backend URL (no scheme): {url!r}")
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryBackend(**kwargs)
    if scheme in _REDIS_SCHEMES:
        return _redis_backend_class()(url, **kwargs)
    if scheme == "redis+cluster":
        try:
            from .redis_cluster import ClusterRedisBackend
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the Redis backend needs the redis package: pip install 'tornado-longconn[redis]'"
            ) from exc
        return ClusterRedisBackend(url, **kwargs)
    if scheme == "redis+sentinel":
        try:
            from .redis_sentinel import SentinelRedisBackend
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the Redis backend needs the redis package: pip install 'tornado-longconn[redis]'"
            ) from exc
        return SentinelRedisBackend(url, **kwargs)
    if scheme in ("nats", "tls"):
        hosts = url.partition("://")[2].rstrip("/")
        servers = [f"{scheme}://{host}" for host in hosts.split(",") if host]
        if not servers:
            raise ValueError(f"no NATS server in {url!r}")
        return _nats_backend_class()(servers, **kwargs)
    raise ValueError(
        f"unknown backend URL scheme {scheme!r}: use memory, redis, rediss, unix, "
        "redis+cluster, redis+sentinel or nats"
    )


def _redis_backend_class() -> type[RedisBackend]:
    try:
        from .redis import RedisBackend
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Redis backend needs the redis package: pip install 'tornado-longconn[redis]'"
        ) from exc
    return RedisBackend


def _nats_backend_class() -> type[NatsBackend]:
    try:
        from .nats import NatsBackend
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the NATS backend needs the nats-py package: pip install 'tornado-longconn[nats]'"
        ) from exc
    return NatsBackend


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":
        return _redis_backend_class()
    if name == "NatsBackend":
        return _nats_backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
