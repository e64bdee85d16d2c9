"""Backends carry messages between processes and keep history.

:class:`MemoryBackend` (default, one process) and ``RedisBackend`` (many
processes and hosts, ``pip install tornado-longconn[redis]``) implement
:class:`Backend`.
"""

from __future__ import annotations

from .base import Backend, Subscriber
from .memory import MemoryBackend

__all__ = ["Backend", "MemoryBackend", "Subscriber"]
