"""Server variants that broadcast ``count`` binary messages of ``size`` bytes to every client.

Usage: ``python -m benchmarks.servers.broadcast_server VARIANT [--policy P]
[--high-water B] [--sndbuf B]``. Clients
connect to ``/ws``; one of them sends the text ``"go <members> <count> <size> <mode>"``.
The server waits until ``members`` connections have joined, then publishes
``make_payload(0..count-1, size)`` as binary messages to all of them:

* ``mode=burst``: every message back to back, in one event-loop iteration;
* ``mode=paced``: one message per event-loop iteration (``await asyncio.sleep(0)``
  between publishes), so nothing can be coalesced across messages.

Variants:

* ``ours``: a ``BroadcastGroup`` (``room.join(self)`` in ``open()``,
  ``await room.publish(m)``), with ``--metrics`` to mount ``/metrics``
  (:mod:`tornado_longconn.metrics`), ``--policy`` / ``--high-water`` for its members
  and ``--sndbuf`` to shrink their kernel send buffers (so that a client that stops
  reading fills the group's buffer within a short run instead of Linux's up to
  4 MB of autotuned socket buffer);
* ``tutorial``: a global list and ``for c in clients: c.write_message(m, binary=True)``;
* ``tornado-await``: stock Tornado awaiting ``write_message`` for every member
  (``await asyncio.gather(*(c.write_message(m, binary=True) for c in clients))``);
* ``websockets``: the ``websockets`` library, ``websockets.broadcast(clients, m)``;
* ``bare-send``: the reference technique: the frame is built once and ``socket.send``
  straight to every member whose stream has nothing pending (the rest goes to
  ``IOStream.write``), with no flow control, no corking and no bookkeeping at all --
  about the least a server that writes each message as it comes can spend.

Every variant runs ``gc.collect()`` once all members have joined, before the clock
starts: the handshakes are not measured, and neither is the garbage-collector debt
they leave (a full collection of a 5,000-connection server takes about 0.35 s on
the reference machine and would land in whichever run crosses the threshold).

After each run (all members gone after a "go") the server reports
``RUN {"cpu_s": ..., "rss_go": ...}``: its CPU seconds from "go" until the last member
left (connection handshakes excluded) and its RSS in bytes when "go" arrived (after
every connection was open).
On SIGTERM it reports ``STATS {...}`` (the group's stats for ``ours``)
and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.harness import PayloadMaker, announce, emit

__all__ = ["VARIANTS", "main"]

VARIANTS = ("ours", "tutorial", "tornado-await", "websockets", "bare-send")


class Ready:
    """Counts members; publishing starts once ``expected`` have joined."""

    def __init__(self) -> None:
        self.members = 0
        self.expected = 0
        self.event = asyncio.Event()
        self.cpu0: float | None = None
        self.rss_go = 0

    def joined(self) -> None:
        self.members += 1
        self.check()

    def left(self) -> None:
        self.members -= 1
        if self.members == 0 and self.cpu0 is not None:
            # One run is over (every client got everything and closed): report the
            # server CPU spent from "go" to here, handshakes excluded.
            run = {"cpu_s": time.process_time() - self.cpu0, "rss_go": self.rss_go}
            emit("RUN", run)
            self.cpu0 = None

    def check(self) -> None:
        if self.expected and self.members >= self.expected:
            self.event.set()

    async def wait(self, expected: int) -> None:
        self.expected = expected
        self.check()
        await self.event.wait()
        self.event.clear()
        self.expected = 0


def current_rss() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def parse_go(message: str | bytes) -> tuple[int, int, int, str] | None:
    if not isinstance(message, str) or not message.startswith("go "):
        return None
    _, members, count, size, mode = message.split()
    if mode not in ("burst", "paced"):
        raise ValueError(f"mode must be burst or paced, not {mode!r}")
    return int(members), int(count), int(size), mode


async def run_publisher(
    ready: Ready, go: tuple[int, int, int, str], publish: Callable[[bytes], Awaitable[None] | None]
) -> None:
    members, count, size, mode = go
    await ready.wait(members)
    gc.collect()  # no variant pays for the handshakes' garbage (see the module doc)
    ready.cpu0 = time.process_time()
    ready.rss_go = current_rss()
    make = PayloadMaker(size)
    paced = mode == "paced"
    for seq in range(count):
        result = publish(make(seq))
        if result is not None:
            await result
        if paced:
            await asyncio.sleep(0)


def tornado_app(variant: str, ready: Ready, args: argparse.Namespace) -> tuple[Any, Any]:
    import tornado.web
    import tornado.websocket

    tasks: set[asyncio.Task[None]] = set()

    def start(coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if variant == "ours":
        from tornado_longconn.backpressure import OverflowPolicy
        from tornado_longconn.broadcast import BroadcastHub

        hub = BroadcastHub(policy=OverflowPolicy(args.policy), high_water=args.high_water)
        room = hub.group("room")

        class Ours(tornado.websocket.WebSocketHandler):
            def open(self) -> None:
                if args.sndbuf:
                    sock = self.ws_connection.stream.socket  # type: ignore[union-attr]
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
                room.join(self)
                ready.joined()

            def on_close(self) -> None:
                ready.left()

            def on_message(self, message: str | bytes) -> None:
                go = parse_go(message)
                if go is not None:

                    async def publish(m: bytes) -> None:
                        await room.publish(m)

                    start(run_publisher(ready, go, publish))

        scrapes = {"scrapes": 0, "scrape_cpu_s": 0.0}

        def stats() -> Any:
            return {**dataclasses.asdict(room.stats()), **scrapes}

        routes: list[Any] = [("/ws", Ours)]
        if args.metrics:
            from tornado_longconn.metrics import LongConnCollector, MetricsHandler

            class Metrics(MetricsHandler):
                """Counts the process CPU each scrape takes (collect and format)."""

                async def get(self) -> None:
                    cpu0 = time.process_time()
                    await super().get()
                    scrapes["scrapes"] += 1
                    scrapes["scrape_cpu_s"] += time.process_time() - cpu0

            collector = LongConnCollector(hubs=[hub])
            routes.append(("/metrics", Metrics, {"collector": collector, "registry": None}))
        return tornado.web.Application(routes), stats

    clients: list[tornado.websocket.WebSocketHandler] = []  # the tutorial's global list

    class Tutorial(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            clients.append(self)
            ready.joined()

        def on_close(self) -> None:
            clients.remove(self)
            ready.left()

        def on_message(self, message: str | bytes) -> None:
            go = parse_go(message)
            if go is None:
                return
            if variant == "bare-send":
                from tornado_longconn._frames import build_frame

                def publish_bare(m: bytes) -> None:
                    frame = build_frame(0x2, m)
                    for c in clients:
                        stream: Any = c.ws_connection.stream  # type: ignore[union-attr]
                        if stream.writing():
                            stream.write(frame)
                            continue
                        try:
                            sent = stream.socket.send(frame)
                        except BlockingIOError:
                            sent = 0
                        if sent < len(frame):
                            stream.write(frame[sent:])

                start(run_publisher(ready, go, publish_bare))
            elif variant == "tutorial":

                def publish(m: bytes) -> None:
                    for c in clients:
                        c.write_message(m, binary=True)

                start(run_publisher(ready, go, publish))
            else:

                async def publish_await(m: bytes) -> None:
                    await asyncio.gather(
                        *(c.write_message(m, binary=True) for c in clients),
                        return_exceptions=True,
                    )

                start(run_publisher(ready, go, publish_await))

    return tornado.web.Application([("/ws", Tutorial)]), lambda: {"members": len(clients)}


async def serve(variant: str, args: argparse.Namespace) -> None:
    ready = Ready()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if variant == "websockets":
        import websockets
        from websockets.asyncio.server import ServerConnection
        from websockets.asyncio.server import serve as ws_serve

        conns: set[ServerConnection] = set()
        tasks: set[asyncio.Task[None]] = set()

        async def handler(ws: ServerConnection) -> None:
            conns.add(ws)
            ready.joined()
            try:
                async for message in ws:
                    go = parse_go(message)
                    if go is not None:

                        def publish(m: bytes) -> None:
                            websockets.broadcast(conns, m)

                        task = asyncio.ensure_future(run_publisher(ready, go, publish))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            except websockets.ConnectionClosed:
                pass
            finally:
                conns.discard(ws)
                ready.left()

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = await ws_serve(
            handler, sock=sock, compression=None, max_queue=None, ping_interval=None, backlog=4096
        )
        announce(sock.getsockname()[1])
        await stop.wait()
        emit("STATS", {"members": len(conns)})
        server.close()
        return

    import tornado.httpserver
    import tornado.netutil

    app, stats = tornado_app(variant, ready, args)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", socket.AF_INET, backlog=4096)
    http = tornado.httpserver.HTTPServer(app)
    http.add_sockets(sockets)
    announce(sockets[0].getsockname()[1])
    await stop.wait()
    emit("STATS", stats())
    http.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--policy", default="close")
    p.add_argument("--high-water", type=int, default=256 * 1024)
    p.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF of each member (ours)")
    p.add_argument("--metrics", action="store_true", help="mount /metrics (ours)")
    args = p.parse_args()
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop

        uvloop.run(serve(args.variant, args))
    else:
        asyncio.run(serve(args.variant, args))


if __name__ == "__main__":
    main()
