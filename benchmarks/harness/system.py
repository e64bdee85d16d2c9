"""Where things are and what the machine allows: paths, CPU pinning, the open-files limit."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

__all__ = ["BENCH_DIR", "CLIENT_CPU", "ROOT", "SERVER_CPU", "pin", "raise_fd_limit"]

#: The ``benchmarks/`` directory and the repository root (the working directory of
#: every process the harness starts, so that ``python -m benchmarks...`` resolves).
BENCH_DIR = Path(__file__).resolve().parent.parent
ROOT = BENCH_DIR.parent

_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
#: CPU the server processes are pinned to (``None``: not pinned).
SERVER_CPU: int | None = _CPUS[0] if len(_CPUS) >= 2 else None
#: CPU the load client processes are pinned to (``None``: not pinned).
CLIENT_CPU: int | None = _CPUS[1] if len(_CPUS) >= 2 else None


def pin(pid: int, cpu: int | None) -> None:
    """Pin process ``pid`` (0: this one) to ``cpu``; nothing if ``cpu`` is ``None``."""
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cpu})


def raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to the hard one; the new soft limit.

    An unlimited hard limit gives ``max(soft, 65536)``. Every connection costs one file
    descriptor in the server and one in the client process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
