"""Backends carry messages between processes and keep history.

:class:`MemoryBackend` (default, one process) and :class:`RedisBackend` (many
processes and hosts, ``pip install tornado-longconn[redis]``) implement
:class:`Backend`. :func:`backend_from_url` picks one from a URL.

``RedisBackend`` is imported on first use, so this package imports without the
``redis`` package installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, Subscriber
from .memory import MemoryBackend

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["Backend", "MemoryBackend", "RedisBackend", "Subscriber", "backend_from_url"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def backend_from_url(url: str, **kwargs: Any) -> Backend:
    """Make the backend a URL names.

    * ``memory://`` -- a :class:`MemoryBackend` (``kwargs`` go to it).
    * ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock`` --
      a :class:`RedisBackend` for that server (``kwargs`` go to it, e.g.
      ``prefix=``). ``redis`` is imported only here.

    Raises :class:`ValueError` for another scheme and :class:`ImportError` (with
    the install hint) when a Redis URL is given and ``redis`` is not installed.
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
    raise ValueError(f"unknown backend URL scheme {scheme!r}: use memory, redis, rediss or unix")


def _redis_backend_class() -> type[RedisBackend]:
    try:
        from .redis import RedisBackend
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Redis backend needs the redis package: pip install 'tornado-longconn[redis]'"
        ) from exc
    return RedisBackend


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":
        return _redis_backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
