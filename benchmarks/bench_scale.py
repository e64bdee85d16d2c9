"""Scale: idle WebSocket connections per process and on the machine, each in one group.

Run: ``python -m benchmarks.bench_scale [--tiny] [--only single|multi] [--variants ...]``
from the repository root.

Two scenarios, every variant in the same run, one after the other:

* ``single``: one server process holding ``--single`` connections (default 19,500; a
  process here may hold at most 20,000 descriptors);
* ``multi``: ``--multi`` connections (default 100,000) over ``--servers`` server
  processes (default 6). ``ours`` runs on the Redis backend (127.0.0.1:6379, a
  unique channel prefix per run): one ``publish`` reaches every process. The peers
  have no cross-process fan-out: each process broadcasts to its own connections at
  the same moment (a lower bound of what a cross-process broadcast would cost them).

Clients: ``--clients`` processes (default: one per 16,000 connections), each from its
own source address (127.0.0.10, 127.0.0.11, ...: one address has about 28,000
ephemeral ports), spreading its connections over every server; they answer every
ping with a pong and record when pings and the broadcast arrive.

Variants, each connection joining one group (or the peer's equivalent, a set):

* ``ours``: ``HeartbeatMixin`` + ``BroadcastGroup`` (``group.join(self)`` in ``open()``);
* ``ours-tuned``: the same with the documented production setting,
  ``tornado_longconn.tune_gc()`` at start-up (freeze after heartbeat ticks, no
  periodic full collection);
* ``tornado``: Tornado's ``websocket_ping_interval``, handlers in a set,
  ``write_message`` to each;
* ``websockets``: the ``websockets`` library's keepalive, ``websockets.broadcast()``;
* ``floor``: the least a Python server can spend on it -- asyncio's transports, a
  handshake, one timer per 50 ms bucket writing a 2-byte ping to each connection
  due, pongs dropped without being parsed, the broadcast one write per connection
  (no parsing, timeouts or flow control: a reference, not a server).

For each heartbeat interval (25 s and 1 s; ``--intervals``) and variant: connect rate
(connections / seconds until the last one opened), RSS per connection (the servers'
RSS after the hold minus before the first connection), server CPU seconds over a
``--hold`` (30 s) hold, heartbeat lateness p99 (a ping's gap after the previous one
on the same connection, minus the interval, measured by the clients), event-loop
stalls during the hold (a 10 ms timer's lateness: the maximum, and the count over
100 ms), then a 64-byte broadcast to all: the time until the last client got it.
Verified: every connection opened, none closed, every client got the broadcast once.

``--tiny`` (CI): 200 connections, 2 server processes for ``multi``, hold 2 s,
interval 1 s. Results: ``benchmarks/results/scale.md``.

The module is also the server (``--serve``) and the client (``--client``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

from benchmarks.harness import (
    BENCH_DIR,
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    Result,
    emit,
    exit_code,
    parse_report,
    pin,
    raise_fd_limit,
    serve_until_sigterm,
    write_markdown,
)

VARIANTS = ("ours", "ours-tuned", "tornado", "websockets", "floor")
MESSAGE = b"x" * 64
STALL = 0.1

# ---------------------------------------------------------------------------- server


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Hold:
    """The server's measurements: SIGUSR1 starts a hold of ``hold`` seconds."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.rss_before = _rss()
        self.opened = 0
        self.closed = 0

    def start(self, count: Any) -> None:
        asyncio.get_running_loop().create_task(self._measure(count))

    async def _measure(self, count: Any) -> None:
        loop = asyncio.get_running_loop()
        gc.collect()
        closed0 = self.closed
        cpu0, t0 = _cpu(), loop.time()
        gc0 = [g["collections"] for g in gc.get_stats()]
        tick = 0.01
        worst = 0.0
        stalls = 0
        end = t0 + self.hold
        while True:
            before = loop.time()
            if before >= end:
                break
            await asyncio.sleep(tick)
            late = loop.time() - before - tick
            worst = max(worst, late)
            if late > STALL:
                stalls += 1
        gc1 = [g["collections"] for g in gc.get_stats()]
        emit(
            "HOLD",
            {
                "connections": count(),
                "cpu_s": _cpu() - cpu0,
                "seconds": loop.time() - t0,
                "rss_growth": _rss() - self.rss_before,
                "closed_during_hold": self.closed - closed0,
                "stall_max_s": worst,
                "stalls": stalls,
                "gc_full": gc1[2] - gc0[2],
            },
        )


def serve(variant: str, interval: float, hold: float, redis_prefix: str) -> None:
    raise_fd_limit()
    meter = Hold(hold)
    timeout = max(10.0, interval)
    loop_box: list[asyncio.AbstractEventLoop] = []
    pending: set[asyncio.Task[Any]] = set()

    def signals(count: Any, broadcast: Any) -> None:
        loop = asyncio.get_running_loop()
        loop_box.append(loop)
        loop.add_signal_handler(signal.SIGUSR1, meter.start, count)

        def fire() -> None:
            emit("BROADCAST", {"t": time.time()})
            result = broadcast()
            if asyncio.iscoroutine(result):
                pending.add(loop.create_task(result))

        loop.add_signal_handler(signal.SIGUSR2, fire)

    if variant == "floor":
        _serve_floor(meter, signals, interval)
        return

    if variant == "websockets":
        from websockets.asyncio.server import ServerConnection, broadcast
        from websockets.asyncio.server import serve as ws_serve

        conns: set[ServerConnection] = set()

        async def handler(ws: ServerConnection) -> None:
            conns.add(ws)
            meter.opened += 1
            try:
                await ws.wait_closed()
            finally:
                conns.discard(ws)
                meter.closed += 1

        servers: list[Any] = []

        async def start() -> int:
            signals(lambda: len(conns), lambda: broadcast(conns, MESSAGE))
            server = await ws_serve(
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
        return

    import tornado.web
    import tornado.websocket

    if variant == "tornado":
        handlers: set[Any] = set()

        class Plain(tornado.websocket.WebSocketHandler):
            def open(self) -> None:
                handlers.add(self)
                meter.opened += 1

            def on_message(self, message: str | bytes) -> None:
                pass

            def on_close(self) -> None:
                handlers.discard(self)
                meter.closed += 1

        def tornado_broadcast() -> None:
            for h in list(handlers):
                try:
                    h.write_message(MESSAGE, binary=True)
                except tornado.websocket.WebSocketClosedError:
                    pass

        app = tornado.web.Application(
            [("/", Plain)],
            websocket_ping_interval=interval,
            websocket_ping_timeout=timeout,
        )

        async def on_start() -> None:
            signals(lambda: len(handlers), tornado_broadcast)

        _serve_tornado_with(app, on_start)
        return

    from tornado_longconn import BroadcastHub, HeartbeatMixin, tune_gc

    if variant == "ours-tuned":
        tune_gc()  # the documented production setting (docs/topics/keepalive.md)

    backend: Any = None
    if redis_prefix:
        from tornado_longconn.backends.redis import RedisBackend

        backend = RedisBackend("redis://127.0.0.1:6379/0", prefix=redis_prefix)
    hub = BroadcastHub(backend)
    group = hub.group("all")

    class Ours(HeartbeatMixin, tornado.websocket.WebSocketHandler):
        heartbeat_interval = interval
        heartbeat_timeout = timeout

        def open(self) -> None:
            group.join(self)
            meter.opened += 1

        def on_message(self, message: str | bytes) -> None:
            pass

        def on_close(self) -> None:
            meter.closed += 1

    async def ours_start() -> None:
        signals(lambda: len(group), lambda: group.publish(MESSAGE))

    _serve_tornado_with(tornado.web.Application([("/", Ours)]), ours_start)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_FLOOR_RESOLUTION = 0.05


class _FloorConn(asyncio.Protocol):
    """The floor: the handshake, then pongs read and dropped unparsed (see ``_serve_floor``)."""

    __slots__ = ("buf", "floor", "transport", "up")

    def __init__(self, floor: _Floor) -> None:
        self.floor = floor
        self.buf = b""
        self.up = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.up:
            return  # a pong: read by the loop, not even parsed
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        key = b""
        for line in buf[:end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.up = True
        self.buf = b""
        self.floor.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.floor.lost(self)


class _Floor:
    """One timer per 50 ms bucket sends an empty ping to each connection due in it."""

    def __init__(self, meter: Hold, interval: float) -> None:
        self.meter = meter
        self.interval = interval
        self.conns: set[_FloorConn] = set()
        self.buckets: dict[int, list[_FloorConn]] = {}

    def opened(self, conn: _FloorConn) -> None:
        self.conns.add(conn)
        self.meter.opened += 1
        self._schedule(conn, asyncio.get_running_loop().time() + self.interval)

    def lost(self, conn: _FloorConn) -> None:
        if conn.up:
            self.conns.discard(conn)
            self.meter.closed += 1

    def _schedule(self, conn: _FloorConn, at: float) -> None:
        key = int(at / _FLOOR_RESOLUTION) + 1
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = []
            asyncio.get_running_loop().call_at(key * _FLOOR_RESOLUTION, self._tick, key)
        bucket.append(conn)

    def _tick(self, key: int) -> None:
        at = key * _FLOOR_RESOLUTION + self.interval
        for conn in self.buckets.pop(key, ()):
            if conn in self.conns and conn.transport is not None:
                conn.transport.write(b"\x89\x00")
                self._schedule(conn, at)

    def broadcast(self) -> None:
        frame = b"\x82" + bytes([len(MESSAGE)]) + MESSAGE
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.write(frame)


def _serve_floor(meter: Hold, signals: Any, interval: float) -> None:
    """The least a Python server holding idle WebSockets with a heartbeat can spend.

    asyncio's own transports, a handshake, one timer per 50 ms bucket writing a
    2-byte ping to each connection due, pongs dropped unread by any parser, the
    broadcast one write per connection: no frame parsing, no timeout, no flow
    control, no per-connection state beyond the transport. Not a server anyone
    should run; the reference the other variants' CPU is compared with.
    """
    floor = _Floor(meter, interval)

    async def start() -> int:
        signals(lambda: len(floor.conns), floor.broadcast)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _FloorConn(floor), "127.0.0.1", 0, backlog=4096)
        return int(server.sockets[0].getsockname()[1])

    serve_until_sigterm(start)


def _serve_tornado_with(app: Any, on_start: Any) -> None:
    import tornado.httpserver
    import tornado.netutil

    async def start() -> int:
        await on_start()
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", socket.AF_INET, backlog=4096)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start)


# ---------------------------------------------------------------------------- client


class _Conn(asyncio.Protocol):
    """One raw WebSocket client: answers pings, records ping gaps and the broadcast."""

    __slots__ = ("buf", "client", "last_ping", "open", "transport")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.buf = b""
        self.open = False
        self.last_ping = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.client.failed += 1
                assert self.transport is not None
                self.transport.close()
                return
            self.open = True
            self.client.opened(self)
            buf = buf[end + 4 :]
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = int.from_bytes(buf[2:4], "big")
                head = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = int.from_bytes(buf[2:10], "big")
                head = 10
            if len(buf) < head + n:
                break
            opcode = buf[0] & 0x0F
            payload = buf[head : head + n]
            buf = buf[head + n :]
            if opcode == 0x9:
                self.client.ping(self, payload)
            elif opcode in (0x1, 0x2):
                self.client.message(payload)
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class _Client:
    def __init__(self, count: int, interval: float) -> None:
        self.count = count
        self.interval = interval
        self.n_open = 0
        self.failed = 0
        self.closed = 0
        self.all_open = asyncio.Event()
        self.lateness: list[float] = []
        self.pings = 0
        self.got = 0
        self.first = 0.0
        self.last = 0.0
        self.recording = False

    def opened(self, conn: _Conn) -> None:
        self.n_open += 1
        if self.n_open == self.count:
            self.all_open.set()

    def ping(self, conn: _Conn, payload: bytes) -> None:
        now = time.monotonic()
        assert conn.transport is not None
        n = len(payload)
        conn.transport.write(bytes((0x8A, 0x80 | n)) + b"\0\0\0\0" + payload)
        if self.recording:
            self.pings += 1
            if conn.last_ping:
                self.lateness.append(now - conn.last_ping - self.interval)
        conn.last_ping = now

    def message(self, payload: bytes) -> None:
        now = time.time()
        if self.got == 0:
            self.first = now
        self.got += 1
        self.last = now
        if self.got == self.count:
            emit("GOT", self.got)

    def lost(self, conn: _Conn) -> None:
        if conn.open:
            self.closed += 1


async def client_main(config: dict[str, Any]) -> None:
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    client = _Client(config["count"], config["interval"])
    ports: list[int] = config["ports"]
    source: str = config["source"]
    sem = asyncio.Semaphore(config.get("concurrency", 100))
    keep: list[Any] = []

    spread: float = config.get("spread", 0.0)

    async def one(i: int) -> None:
        if spread:
            # Opens spread evenly over ``spread`` seconds: each connection's
            # heartbeat phase as on a long-running server (opened at random times).
            await asyncio.sleep(spread * i / client.count)
        async with sem:
            try:
                transport, _proto = await loop.create_connection(
                    lambda: _Conn(client),
                    "127.0.0.1",
                    ports[i % len(ports)],
                    local_addr=(source, 0),
                )
                keep.append(transport)
            except OSError as exc:
                client.failed += 1
                print(f"connect failed: {exc}", file=sys.stderr)
                if client.failed + client.n_open >= client.count:
                    client.all_open.set()

    report = asyncio.Event()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(client, "recording", True))
    loop.add_signal_handler(signal.SIGUSR2, report.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    t0 = time.monotonic()
    tasks = [loop.create_task(one(i)) for i in range(client.count)]
    await asyncio.wait_for(client.all_open.wait(), config["timeout"])
    emit(
        "CONNECTED",
        {"opened": client.n_open, "failed": client.failed, "seconds": time.monotonic() - t0},
    )
    await asyncio.gather(*tasks)
    await report.wait()
    lateness = sorted(client.lateness)
    emit(
        "CLIENT",
        {
            "opened": client.n_open,
            "failed": client.failed,
            "closed": client.closed,
            "pings": client.pings,
            "late_p99_s": lateness[int(0.99 * (len(lateness) - 1))] if lateness else None,
            "late_max_s": lateness[-1] if lateness else None,
            "gaps": len(lateness),
            "got": client.got,
            "first": client.first,
            "last": client.last,
        },
    )
    await stop.wait()
    for t in keep:
        t.abort()


# ---------------------------------------------------------------------------- orchestrator


class _Proc:
    """A child process whose stdout carries report lines."""

    def __init__(self, cmd: list[str], cpu: int | None) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(ROOT), text=True
        )
        pin(self.proc.pid, cpu)
        self.reports: list[tuple[str, Any]] = []

    def wait_report(self, kind: str, timeout: float) -> Any:
        for k, v in self.reports:
            if k == kind:
                self.reports.remove((k, v))
                return v
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), True)
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"no {kind} report within {timeout:.0f} s")
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"process exited before its {kind} report")
                parsed = parse_report(line.rstrip("\n"))
                if parsed is None:
                    continue
                if parsed[0] == kind:
                    return parsed[1]
                self.reports.append(parsed)
        finally:
            sel.unregister(self.proc.stdout)
            sel.close()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _delete_keys(prefix: str) -> None:
    """Remove what the run's Redis backend left under its unique prefix."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def run_one(
    scenario: str,
    variant: str,
    interval: float,
    connections: int,
    servers: int,
    clients: int,
    hold: float,
    spread: float = 0.0,
) -> Result:
    me = [sys.executable, "-m", "benchmarks.bench_scale"]
    prefix = ""
    if variant.startswith("ours") and servers > 1:
        prefix = f"bench-scale-{uuid.uuid4().hex[:8]}:"
    procs: list[_Proc] = []
    label = f"{scenario} {connections:,} / heartbeat {interval:g} s"
    if spread:
        label += f" / opened over {spread:g} s"
    try:
        srv = []
        for _ in range(servers):
            p = _Proc([*me, "--serve", variant, str(interval), str(hold), prefix], SERVER_CPU)
            procs.append(p)
            srv.append(p)
        ports = [int(p.wait_report("PORT", 60)) for p in srv]
        cli = []
        base, extra = divmod(connections, clients)
        for i in range(clients):
            config = {
                "count": base + (1 if i < extra else 0),
                "ports": ports,
                "source": f"127.0.0.{10 + i}",
                "interval": interval,
                "timeout": max(120.0, connections / 100) + spread,
                "spread": spread,
            }
            p = _Proc([*me, "--client", json.dumps(config)], CLIENT_CPU)
            procs.append(p)
            cli.append(p)
        connected = [
            p.wait_report("CONNECTED", max(180.0, connections / 100) + spread) for p in cli
        ]
        opened = sum(c["opened"] for c in connected)
        connect_s = max(c["seconds"] for c in connected)
        for p in cli:
            p.signal(signal.SIGUSR1)  # record pings from now on
        for p in srv:
            p.signal(signal.SIGUSR1)  # hold
        holds = [p.wait_report("HOLD", hold + 120) for p in srv]
        # The broadcast: one publish through Redis for ours on several processes,
        # else every process to its own connections.
        senders = srv[:1] if prefix else srv
        for p in senders:
            p.signal(signal.SIGUSR2)
        sent = min(float(p.wait_report("BROADCAST", 30)["t"]) for p in senders)
        for p in cli:
            try:
                p.wait_report("GOT", 30 + connections / 5000)
            except RuntimeError:
                pass  # counted below: the broadcast did not reach every connection
        for p in cli:
            p.signal(signal.SIGUSR2)
        reports = [p.wait_report("CLIENT", 60) for p in cli]
    except RuntimeError as exc:
        return Result(variant, label, ok=False, error=str(exc)[-300:], extra={})
    finally:
        for p in procs:
            p.stop()
        if prefix:
            _delete_keys(prefix)
    errors = []
    if opened != connections:
        errors.append(f"{connections - opened} connections did not open")
    closed = sum(r["closed"] for r in reports)
    if closed:
        errors.append(f"{closed} connections closed")
    got = sum(r["got"] for r in reports)
    if got != connections:
        errors.append(f"broadcast reached {got} of {connections}")
    lates = [r["late_p99_s"] for r in reports if r["late_p99_s"] is not None]
    last = max((r["last"] for r in reports if r["got"]), default=sent)
    stats = {
        "connections": opened,
        # Paced opens (spread) measure no connect rate.
        "connect_rate": opened / connect_s if connect_s and not spread else None,
        "rss_per_conn": sum(h["rss_growth"] for h in holds) / max(1, opened),
        "cpu_s": sum(h["cpu_s"] for h in holds),
        "hold_s": max(h["seconds"] for h in holds),
        "late_p99_s": max(lates) if lates else None,
        "stall_max_s": max(h["stall_max_s"] for h in holds),
        "stalls": sum(h["stalls"] for h in holds),
        "gc_full": sum(h["gc_full"] for h in holds),
        "broadcast_s": last - sent,
        "closed": closed,
        "pings": sum(r["pings"] for r in reports),
    }
    return Result(
        variant,
        label,
        ok=not errors,
        error="; ".join(errors),
        messages=got,
        seconds=stats["hold_s"],
        server_cpu_s=stats["cpu_s"],
        extra={"stats": stats},
    )


def table(rows: list[Result]) -> str:
    head = [
        "scenario",
        "variant",
        "verified",
        "connect /s",
        "RSS/conn KiB",
        "server CPU s (hold)",
        "CPU vs websockets",
        "pings in hold",
        "CPU µs per ping",
        "heartbeat p99 late ms",
        "max stall ms",
        "stalls >100 ms",
        "full GCs",
        "64 B to all ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    ws_cpu = {
        r.scenario: r.extra["stats"]["cpu_s"]
        for r in rows
        if r.variant == "websockets" and r.extra.get("stats")
    }
    for r in rows:
        s = r.extra.get("stats")
        ok = "yes" if r.ok else "NO: " + r.error[:100]
        if not s:
            lines.append(f"| {r.scenario} | {r.variant} | {ok} |" + " - |" * (len(head) - 3))
            continue
        ref = ws_cpu.get(r.scenario)
        late = s["late_p99_s"]
        cells = [
            r.scenario,
            r.variant,
            ok,
            f"{s['connect_rate']:,.0f}" if s["connect_rate"] is not None else "paced",
            f"{s['rss_per_conn'] / 1024:.2f}",
            f"{s['cpu_s']:.2f}",
            f"{s['cpu_s'] / ref:.2f}x" if ref else "-",
            f"{s.get('pings', 0):,}",
            f"{s['cpu_s'] / s['pings'] * 1e6:,.0f}" if s.get("pings") else "-",
            f"{late * 1000:.0f}" if late is not None else "-",
            f"{s['stall_max_s'] * 1000:.0f}",
            str(s["stalls"]),
            str(s["gc_full"]),
            f"{s['broadcast_s'] * 1000:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        variant, interval, hold = argv[1], float(argv[2]), float(argv[3])
        serve(variant, interval, hold, argv[4] if len(argv) > 4 else "")
        return 0
    if argv[:1] == ["--client"]:
        asyncio.run(client_main(json.loads(argv[1])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", default="", help="single or multi (default: both)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--single", type=int, default=19_500)
    p.add_argument("--multi", type=int, default=100_000)
    p.add_argument("--servers", type=int, default=6)
    p.add_argument("--clients", type=int, default=0, help="default: one per 16,000")
    p.add_argument("--hold", type=float, default=30.0)
    p.add_argument("--intervals", default="25,1")
    p.add_argument(
        "--steady",
        default="25",
        help="intervals whose one-process scenario runs again with the opens spread over "
        "one interval (heartbeat phases as on a long-running server); '' for none",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.single, args.multi, args.servers, args.hold = 200, 200, 2, 2.0
        args.intervals = args.steady = "1"
    variants = [v for v in args.variants.split(",") if v]
    intervals = [float(x) for x in args.intervals.split(",")]
    steady = {float(x) for x in args.steady.split(",") if x}
    scenarios = [("single", args.single, 1), ("multi", args.multi, args.servers)]
    if args.only:
        scenarios = [s for s in scenarios if s[0] == args.only]
    rows: list[Result] = []
    for name, n, servers in scenarios:
        clients = args.clients or max(1, -(-n // 16_000))
        if args.tiny:
            clients = 2 if name == "multi" else 1
        runs: list[tuple[float, float]] = []
        for i in intervals:
            runs.append((i, 0.0))
            if name == "single" and i in steady:
                runs.append((i, i))
        for interval, spread in runs:
            for variant in variants:
                row = run_one(name, variant, interval, n, servers, clients, args.hold, spread)
                rows.append(row)
                s = row.extra.get("stats") or {}
                print(
                    f"{row.scenario:<36} {variant:<11} ok={row.ok} "
                    + " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()
                    )
                    + (f" error={row.error}" if row.error else ""),
                    flush=True,
                )
    if not args.tiny:
        body = table(rows)
        write_markdown(
            BENCH_DIR / "results" / "scale.md",
            "Scale benchmark: idle connections per process and per machine",
            "python -m benchmarks.bench_scale " + " ".join(argv),
            body,
        )
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
