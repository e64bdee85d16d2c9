"""Server variants that hold idle WebSocket connections with keepalive pings.

Usage: ``python -m benchmarks.servers.heartbeat_server VARIANT CONNECTIONS HOLD INTERVAL
TIMEOUT [--dead-peer]``.

The server measures itself: from the moment ``CONNECTIONS`` WebSockets are open it
waits ``HOLD`` seconds, then reports ``STATS {json}`` with the CPU seconds (user +
system) and the RSS growth of exactly that window, the RSS per open connection
(measured against the RSS before the first connection), and the heartbeats it saw.
Connection setup is not part of the CPU figure.

``--dead-peer`` (``ours`` variants only; ``HOLD`` is ignored): some clients freeze --
right after answering a ping they send ``"frozen <t>"`` (``t`` from
``time.monotonic()``, one clock for every process of the host) and then neither read
nor write. The server notes, for each such connection, the time from ``t`` to its
``on_close`` and whether the heartbeat timed it out; on SIGTERM it reports ``DEAD
{json}``: ``connections``, ``frozen``, ``delays`` (seconds, one per frozen connection
closed), ``since_activity`` (the same measured from when the server received the
``frozen`` frame, the peer's last activity), ``timed_out`` (of those, closed by the
heartbeat), ``live_timed_out`` (other connections the heartbeat closed: false
detections) and the heartbeat counters.

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

import argparse
import asyncio
import gc
import os
import resource
import sys
import time
from typing import Any

from benchmarks.harness import emit, raise_fd_limit, serve_tornado, serve_until_sigterm

__all__ = ["VARIANTS", "main"]

VARIANTS = ("none", "ours", "ours-gc-freeze", "tornado", "websockets")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Counts opened connections and measures the hold window once all are open."""

    def __init__(self, connections: int, hold: float | None, extra: Any = None) -> None:
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
        if self.opened == self.connections and self.hold is not None:
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
        await asyncio.sleep(self.hold or 0.0)
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
        emit("STATS", stats)


class DeadPeers:
    """Dead-peer detection: the delay from each client's freeze to its connection's close."""

    def __init__(self) -> None:
        self.frozen = 0
        self.delays: list[float] = []
        self.since_activity: list[float] = []
        self.timed_out = 0
        self.live_timed_out = 0

    def closed(self, frozen: tuple[float, float] | None, timed_out: bool) -> None:
        """A connection closed; ``frozen``: its client's freeze time and when it arrived."""
        if frozen is None:
            self.live_timed_out += timed_out
            return
        now = time.monotonic()
        self.delays.append(now - frozen[0])
        self.since_activity.append(now - frozen[1])
        self.timed_out += timed_out


def tornado_app(
    variant: str, meter: Meter, interval: float, timeout: float, dead: DeadPeers | None = None
) -> Any:
    import tornado.web
    import tornado.websocket

    from tornado_longconn.heartbeat import HeartbeatMixin, heartbeat_stats

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

    class Watched(Ours):
        """Notes when its client froze (it says so) and when the heartbeat closed it."""

        frozen: tuple[float, float] | None = None

        def on_message(self, message: str | bytes) -> None:
            if dead is not None and isinstance(message, str) and message.startswith("frozen "):
                self.frozen = (float(message[7:]), time.monotonic())
                dead.frozen += 1

        def on_close(self) -> None:
            if dead is not None:
                dead.closed(self.frozen, self.heartbeat_timed_out)
            super().on_close()

    settings: dict[str, Any] = {}
    handler: type[Any] = Plain
    if variant == "tornado":
        settings = {
            "websocket_ping_interval": interval,
            "websocket_ping_timeout": min(timeout, interval),  # Tornado's cap
        }
    elif variant in ("ours", "ours-gc-freeze"):
        handler = Ours if dead is None else Watched
        settings = {"heartbeat_gc_freeze": variant == "ours-gc-freeze"}
    app = tornado.web.Application([("/", handler)], **settings)
    if variant.startswith("ours"):

        def extra() -> dict[str, Any]:
            stats = heartbeat_stats(app)
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


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments (see the module docstring) and serve until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("connections", type=int)
    p.add_argument("hold", type=float)
    p.add_argument("interval", type=float)
    p.add_argument("timeout", type=float)
    p.add_argument("--dead-peer", action="store_true", help="measure dead-peer detection")
    args = p.parse_args(argv)
    variant, connections = args.variant, args.connections
    interval, timeout = args.interval, args.timeout
    if args.dead_peer and not variant.startswith("ours"):
        raise SystemExit("--dead-peer measures the ours variants only")
    limit = raise_fd_limit()
    if limit < connections + 100:
        raise SystemExit(f"open-files limit {limit} is too low for {connections} connections")
    meter = Meter(connections, None if args.dead_peer else args.hold)
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
    elif args.dead_peer:
        dead = DeadPeers()
        app = tornado_app(variant, meter, interval, timeout, dead)

        def report_dead() -> None:
            emit(
                "DEAD",
                {
                    "connections": meter.opened,
                    "frozen": dead.frozen,
                    "delays": dead.delays,
                    "since_activity": dead.since_activity,
                    "timed_out": dead.timed_out,
                    "live_timed_out": dead.live_timed_out,
                    **meter.extra(),
                },
            )

        serve_tornado(app, on_stop=report_dead)
    else:
        serve_tornado(tornado_app(variant, meter, interval, timeout))


if __name__ == "__main__":
    main()
