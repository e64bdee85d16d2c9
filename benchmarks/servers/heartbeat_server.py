"""Server variants that hold idle WebSocket connections with keepalive pings.

Usage: ``python heartbeat_server.py VARIANT CONNECTIONS HOLD INTERVAL TIMEOUT``.

The server measures itself: from the moment ``CONNECTIONS`` WebSockets are open it
waits ``HOLD`` seconds, then prints one ``STATS {json}`` line with the CPU seconds
(user + system) and the RSS growth of exactly that window, the RSS per open
connection (measured against the RSS before the first connection), and the
heartbeats it saw. Connection setup is not part of the CPU figure.

Variants (every one pings every ``INTERVAL`` seconds; a peer is dropped after
``TIMEOUT`` more seconds without an answer -- Tornado caps its own timeout at the
interval):

* ``none``: Tornado without any keepalive (the baseline for RSS and CPU);
* ``ours``: Tornado + ``HeartbeatMixin`` (one shared timer wheel per loop);
* ``ours-gc-freeze``: the same with ``heartbeat_gc_freeze=True``;
* ``tornado``: Tornado's ``websocket_ping_interval`` (one task per connection);
* ``websockets``: the ``websockets`` library's keepalive (one task per connection).

With ``BENCH_DEBUG=1`` the ``ours`` variants print the event-loop lag and the
heartbeat counters to stderr every second.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
from typing import Any

from harness import serve_tornado, serve_until_sigterm

__all__ = ["VARIANTS", "main"]

VARIANTS = ("none", "ours", "ours-gc-freeze", "tornado", "websockets")


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Counts opened connections and measures the hold window once all are open."""

    def __init__(self, connections: int, hold: float, extra: Any = None) -> None:
        self.connections = connections
        self.hold = hold
        self.opened = 0
        self.closed = 0
        self.rss_before = rss_bytes()
        self.extra = extra
        self.debug: Any = None
        self._debugging = False

    def on_open(self) -> None:
        self.opened += 1
        if self.debug is not None and not self._debugging:
            self._debugging = True
            asyncio.get_running_loop().create_task(self.debug())
        if self.opened == self.connections:
            asyncio.get_running_loop().create_task(self._measure())

    def on_close(self) -> None:
        self.closed += 1

    async def _measure(self) -> None:
        rss0, cpu0, t0 = rss_bytes(), cpu_seconds(), time.monotonic()
        closed0 = self.closed
        gc0 = [g["collections"] for g in gc.get_stats()]
        gc_time = [0.0, 0.0]  # seconds in the collector during the hold, start of the current

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_time[1] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - gc_time[1]

        gc.callbacks.append(on_gc)
        await asyncio.sleep(self.hold)
        gc.callbacks.remove(on_gc)
        cpu1, rss1, t1 = cpu_seconds(), rss_bytes(), time.monotonic()
        gc1 = [g["collections"] for g in gc.get_stats()]
        stats = {
            "connections": self.opened,
            "cpu_s": cpu1 - cpu0,
            "seconds": t1 - t0,
            "rss_before_mb": self.rss_before / 1e6,
            "rss_open_mb": rss0 / 1e6,
            "rss_end_mb": rss1 / 1e6,
            "rss_per_conn": (rss1 - self.rss_before) / max(1, self.opened),
            "closed_during_hold": self.closed - closed0,
            "gc_collections": [b - a for a, b in zip(gc0, gc1, strict=True)],
            "gc_seconds": gc_time[0],
        }
        if self.extra is not None:
            stats.update(self.extra())
        print("STATS " + json.dumps(stats), flush=True)


def tornado_app(variant: str, meter: Meter, interval: float, timeout: float) -> Any:
    import tornado.web
    import tornado.websocket

    from tornado_longconn.heartbeat import HeartbeatMixin, HeartbeatStats

    class Plain(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            meter.on_open()

        def on_message(self, message: str | bytes) -> None:
            pass

        def on_close(self) -> None:
            meter.on_close()

    class Ours(HeartbeatMixin, Plain):
        heartbeat_interval = interval
        heartbeat_timeout = timeout

    settings: dict[str, Any] = {}
    handler: type[Any] = Plain
    if variant == "tornado":
        settings = {
            "websocket_ping_interval": interval,
            "websocket_ping_timeout": min(timeout, interval),  # Tornado's cap
        }
    elif variant in ("ours", "ours-gc-freeze"):
        handler = Ours
        settings = {"heartbeat_gc_freeze": variant == "ours-gc-freeze"}
    app = tornado.web.Application([("/", handler)], **settings)
    if variant.startswith("ours"):
        stats = HeartbeatStats.for_application(app)

        def extra() -> dict[str, Any]:
            return {
                "answers": stats.count,
                "pings_sent": stats.pings_sent,
                "timeouts": stats.timeouts,
                "p50_ms": (stats.p50 or 0) * 1000,
                "p99_ms": (stats.p99 or 0) * 1000,
            }

        meter.extra = extra
        if os.environ.get("BENCH_DEBUG"):

            async def report() -> None:
                loop = asyncio.get_running_loop()
                while True:
                    t = loop.time()
                    await asyncio.sleep(1.0)
                    lag = loop.time() - t - 1.0
                    print(
                        f"opened={meter.opened} lag={lag * 1000:.0f}ms {extra()}",
                        file=sys.stderr,
                        flush=True,
                    )

            meter.debug = report
    return app


def main(argv: list[str]) -> None:
    variant, connections, hold = argv[1], int(argv[2]), float(argv[3])
    interval, timeout = float(argv[4]), float(argv[5])
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    limit = raise_fd_limit()
    if limit < connections + 100:
        raise SystemExit(f"open-files limit {limit} is too low for {connections} connections")
    meter = Meter(connections, hold)
    if variant == "websockets":
        from websockets.asyncio.server import ServerConnection, serve

        async def handler(ws: ServerConnection) -> None:
            meter.on_open()
            try:
                await ws.wait_closed()
            finally:
                meter.on_close()

        servers: list[Any] = []  # keep the server referenced while serving

        async def start() -> int:
            server = await serve(
                handler,
                "127.0.0.1",
                0,
                ping_interval=interval,
                ping_timeout=timeout,
                compression=None,
                backlog=4096,
            )
            servers.append(server)
            return int(next(iter(server.sockets)).getsockname()[1])

        serve_until_sigterm(start)
    else:
        serve_tornado(tornado_app(variant, meter, interval, timeout))


if __name__ == "__main__":
    main(sys.argv)
