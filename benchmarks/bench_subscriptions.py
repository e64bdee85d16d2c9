"""Client-driven subscriptions: many topics per connection, against python-socketio rooms.

Scenario ``fanout`` (both variants, in-memory, same run): C connections each
subscribe to 10 of T topics (the protocol's ``subscribe`` frames; for the peer an
acknowledged Socket.IO event whose handler calls ``sio.enter_room``); then the
server publishes ``count`` rounds of one message to every topic (``POST
/publish``; ours ``group.publish_nowait``, the peer ``sio.emit("m", text,
to=room)``). The load client (this process, pinned to the client CPU) checks that
every connection gets every message of each of its topics once and in order.
Measured: delivered messages per second (first to last message received),
server CPU, and server RSS per subscription (RSS after the subscriptions minus
RSS once every connection was open, over C x 10; both read after a garbage
collection in the server; the topics -- our groups -- are made before either).

Scenario ``storm`` (ours on a private Redis): the same clients subscribe, get
``count`` rounds, the server process is stopped, ``count`` more rounds are
published straight to Redis while it is down, a new server process starts, and
every client reconnects at once and resubscribes with its cursors while
``count`` more rounds are published live. Reported: the time from the new
server's start until every client has every message, and the messages lost
(or resynced) and duplicated (both must be 0).

``python -m benchmarks.bench_subscriptions`` (10,000 connections, 1,000 topics,
100 rounds) writes ``benchmarks/results/subscriptions.md``; ``--tiny`` runs
both scenarios at 60 connections x 20 topics x 5 rounds for CI; ``--connections``,
``--topics``, ``--count`` change the size.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import random
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.harness import (
    BENCH_DIR,
    CLIENT_CPU,
    Result,
    ServerProcess,
    bench_args,
    exit_code,
    pin,
    raise_fd_limit,
    request_report,
    server_command,
    write_markdown,
)
from benchmarks.servers.subs_socketio import text

RESULTS = BENCH_DIR / "results" / "subscriptions.md"
PER_CONNECTION = 10
SIZE = 64


def topics_of(index: int, topics: int) -> list[str]:
    """The 10 topics of connection ``index`` (distinct when ``topics`` >= 10)."""
    chosen: list[str] = []
    k = 0
    while len(chosen) < min(PER_CONNECTION, topics):
        name = f"t{(index * 7 + k * 101) % topics}"
        if name not in chosen:
            chosen.append(name)
        k += 1
    return chosen


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n <= 0xFFFF:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload  # zero mask key: no masking work


class Subscriber:
    """One client's state across reconnects: per topic the next sequence and cursor."""

    __slots__ = (
        "cursors",
        "done",
        "errors",
        "expected",
        "next",
        "received",
        "resyncs",
        "subscribed",
    )

    def __init__(self, topics: list[str], expected: int) -> None:
        self.next = dict.fromkeys(topics, 0)
        self.cursors: dict[str, str] = {}
        self.expected = expected  # messages per topic so far expected
        self.received = 0
        self.errors = 0
        self.resyncs = 0
        self.done = False
        self.subscribed = False  # counted once in Bench.subscribed, across reconnects


class Bench:
    """Shared counters of all connections of one run, and the moments to wait for."""

    def __init__(self) -> None:
        self.first = 0.0
        self.last = 0.0
        self.delivered = 0
        self.duplicates = 0
        self.lost = 0
        self.opened = 0
        self.subscribed = 0
        self.complete = 0
        self.retries = 0  # subscribes sent again after an `unavailable` answer
        self.reconnects = 0  # connections the server closed before they had everything
        # (port, path) to reconnect to when the server closes a connection early (1011
        # after a backend error): what a real client does; None: no reconnecting.
        self.reconnect: tuple[int, str] | None = None
        self.conns: list[Conn] = []  # every connection made (to abort them at the end)
        self.close_codes: dict[int, int] = {}  # close frames from the server, by code
        self.dropped = 0  # connections lost without a close frame
        self.changed = asyncio.Event()
        self.errors: list[str] = []

    def note(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)

    async def wait(self, what: Callable[[], bool], timeout: float, phase: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not what():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"timed out {phase} (opened {self.opened}, subscribed {self.subscribed}, "
                    f"complete {self.complete}, delivered {self.delivered}, "
                    f"closes {self.close_codes}, dropped {self.dropped}); "
                    f"errors: {self.errors[:5]}"
                )
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass


class Conn(asyncio.Protocol):
    """One WebSocket speaking our protocol (``sio`` False) or Socket.IO over Engine.IO v4."""

    def __init__(self, bench: Bench, sub: Subscriber, path: str, port: int, sio: bool) -> None:
        self.bench = bench
        self.sub = sub
        self.path = path
        self.port = port
        self.sio = sio
        self.transport: Any = None
        self.buf = b""
        self.handshake = True
        self.key = base64.b64encode(secrets.token_bytes(16))
        self.acks = 0
        self.auto_subscribe = False
        self.got_close = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.bench.conns.append(self)
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        bench = self.bench
        if not self.got_close:
            bench.dropped += 1
        if bench.reconnect is not None and not self.sub.done and not self.sio:
            bench.reconnects += 1
            port, path = bench.reconnect
            loop = asyncio.get_running_loop()
            loop.call_later(random.uniform(0.1, 0.5), _reopen, bench, self.sub, port, path)

    def send_text(self, data: str) -> None:
        self.transport.write(_frame(1, data.encode()))

    def subscribe(self) -> None:
        sub = self.sub
        if self.sio:
            for k, topic in enumerate(sub.next):
                self.send_text(f'42{k}["sub","{topic}"]')
            return
        frames = []
        for k, topic in enumerate(sub.next):
            request: dict[str, Any] = {"type": "subscribe", "id": k, "topic": topic}
            cursor = sub.cursors.get(topic)
            if cursor is not None:
                request["cursor"] = cursor
            frames.append(_frame(1, json.dumps(request).encode()))
        self.transport.write(b"".join(frames))

    def resubscribe(self, topic: str, rid: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        request: dict[str, Any] = {"type": "subscribe", "id": rid, "topic": topic}
        cursor = self.sub.cursors.get(topic)
        if cursor is not None:
            request["cursor"] = cursor
        self.transport.write(_frame(1, json.dumps(request).encode()))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.handshake:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.bench.note(f"handshake: {buf[:40]!r}")
                self.transport.abort()
                return
            self.handshake = False
            buf = buf[end + 4 :]
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            op = buf[pos] & 0x0F
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            payload = buf[pos + hl : end]
            pos = end
            if op == 1:
                self.on_text(payload)
            elif op == 9:
                self.transport.write(_frame(0xA, payload))
            elif op == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.bench.close_codes[code] = self.bench.close_codes.get(code, 0) + 1
                self.got_close = True
                self.transport.close()
                return
        self.buf = buf[pos:]

    def on_text(self, payload: bytes) -> None:
        if self.sio:
            if payload.startswith(b'42["m","'):
                self.on_message(payload[8:-2], None)
            elif payload.startswith(b"43"):
                self.acks += 1
                if self.acks == len(self.sub.next):
                    self.bench.subscribed += 1
                    self.bench.changed.set()
            elif payload == b"2":
                self.send_text("3")
            elif payload.startswith(b"0{"):
                self.send_text("40")
            elif payload.startswith(b"40"):
                self.bench.opened += 1
                self.bench.changed.set()
            return
        if payload.startswith(b'{"topic":'):
            at = payload.index(b'"cursor":"') + 10
            cursor = payload[at : payload.index(b'"', at)]
            data = payload.index(b'"data":"', at) + 8
            self.on_message(payload[data:-2], cursor)
            return
        frame = json.loads(payload)
        kind = frame.get("type")
        if kind == "welcome":
            self.bench.opened += 1
            self.bench.changed.set()
            if self.auto_subscribe:
                self.subscribe()
        elif kind == "subscribed":
            self.sub.cursors.setdefault(frame["topic"], frame["cursor"])
            self.acks += 1
            if self.acks == len(self.sub.next) and not self.sub.subscribed:
                self.sub.subscribed = True
                self.bench.subscribed += 1
                self.bench.changed.set()
        elif kind == "error" and frame.get("code") in ("unavailable", "conflict"):
            # 503: the backend could not answer now (409: the earlier attempt with this
            # id is still pending); a client subscribes again a little later (jittered).
            self.bench.retries += 1
            loop = asyncio.get_running_loop()
            loop.call_later(
                random.uniform(0.05, 0.3), self.resubscribe, frame["topic"], frame["id"]
            )
        elif kind == "resync":
            self.sub.resyncs += 1
            self.bench.lost += 1
            self.bench.note(f"resync {frame}")
        else:
            self.bench.note(f"unexpected {frame}")

    def on_message(self, data: bytes, cursor: bytes | None) -> None:
        bench = self.bench
        now = time.perf_counter()
        if not bench.first:
            bench.first = now
        bench.last = now
        space = data.index(b" ")
        topic = data[:space].decode()
        seq = int(data[space + 1 : space + 17], 16)
        sub = self.sub
        expected = sub.next.get(topic)
        if expected is None:
            bench.note(f"message of {topic} not subscribed")
            return
        if seq != expected:
            if seq < expected:
                bench.duplicates += 1
            else:
                bench.lost += seq - expected
            bench.note(f"{topic}: seq {seq}, expected {expected}")
        sub.next[topic] = seq + 1
        if cursor is not None:
            sub.cursors[topic] = cursor.decode()
        bench.delivered += 1
        sub.received += 1
        if not sub.done and all(v >= sub.expected for v in sub.next.values()):
            sub.done = True
            bench.complete += 1
            bench.changed.set()


def _reopen(bench: Bench, sub: Subscriber, port: int, path: str) -> None:
    """Connect again and resubscribe with the cursors (a client after an early close)."""

    def made() -> Conn:
        conn = Conn(bench, sub, path, port, False)
        conn.auto_subscribe = True
        return conn

    task = asyncio.ensure_future(
        asyncio.get_running_loop().create_connection(made, "127.0.0.1", port)
    )
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def open_all(
    bench: Bench,
    subs: list[Subscriber],
    port: int,
    path: str,
    sio: bool,
    *,
    auto_subscribe: bool = False,
) -> list[Conn]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)
    conns: list[Conn] = []

    def made(sub: Subscriber) -> Conn:
        conn = Conn(bench, sub, path, port, sio)
        conn.auto_subscribe = auto_subscribe
        return conn

    async def one(sub: Subscriber) -> None:
        async with gate:
            _, conn = await loop.create_connection(lambda: made(sub), "127.0.0.1", port)
            conns.append(conn)

    await asyncio.gather(*(one(s) for s in subs))
    return conns


def post(port: int, path: str, timeout: float = 3600) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=b"")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: {response.status}")
    finally:
        conn.close()


async def fanout(variant: str, connections: int, topics: int, count: int) -> Result:
    sio = variant == "socketio"
    script = "subs_socketio" if sio else "subs_longconn"
    path = "/socket.io/?EIO=4&transport=websocket" if sio else "/ws"
    bench = Bench()
    subs = [Subscriber(topics_of(i, topics), count) for i in range(connections)]
    # Generous: the peer needs about 1 ms per handshake and per delivery on this machine.
    timeout = 120 + connections / 10 + connections * PER_CONNECTION * count / 1000
    with ServerProcess(server_command(script)) as server:
        # The topics exist before the baseline (ours: their groups; a topic's cost is
        # not a subscription's): a publish of zero rounds makes them.
        await asyncio.to_thread(post, server.port, f"/publish?topics={topics}&count=0&size={SIZE}")
        base = request_report(server, "RSS")
        conns = await open_all(bench, subs, server.port, path, sio)
        await bench.wait(lambda: bench.opened == connections, timeout, "opening")
        opened = request_report(server, "RSS")
        for conn in conns:
            conn.subscribe()
        await bench.wait(lambda: bench.subscribed == connections, timeout, "subscribing")
        subscribed = request_report(server, "RSS")
        server.mark()
        publish = asyncio.ensure_future(
            asyncio.to_thread(
                post, server.port, f"/publish?topics={topics}&count={count}&size={SIZE}"
            )
        )
        await bench.wait(
            lambda: bench.complete == connections or publish.done(), timeout, "delivering"
        )
        await publish
        await bench.wait(lambda: bench.complete == connections, timeout, "delivering")
        m = server.measure()
        for conn in conns:
            conn.transport.abort()
    expected = connections * PER_CONNECTION * count
    ok = bench.delivered == expected and not bench.lost and not bench.duplicates
    return Result(
        variant=variant,
        scenario=f"fanout {connections} conns x {PER_CONNECTION} of {topics} topics x {count}",
        ok=ok,
        error="; ".join(bench.errors)[:500],
        messages=bench.delivered,
        seconds=bench.last - bench.first,
        server_cpu_s=m["cpu_s"],
        rss_start_mb=subscribed / 1e6,
        rss_growth_mb=m["rss_growth_mb"],
        extra={
            "bytes_per_subscription": (subscribed - opened) / (connections * PER_CONNECTION),
            "bytes_per_connection": (opened - base) / connections,
            "lost": bench.lost,
            "duplicates": bench.duplicates,
        },
    )


async def storm(connections: int, topics: int, count: int) -> Result:
    from benchmarks.bench_redis import start_redis
    from tornado_longconn.backends.redis import RedisBackend
    from tornado_longconn.log import HistoryLimit

    redis_proc, redis_port, tmp = start_redis()
    url = f"redis://127.0.0.1:{redis_port}/0"
    prefix = "subs:"
    cmd = server_command("subs_longconn", "--redis", url, "--prefix", prefix)
    bench = Bench()
    subs = [Subscriber(topics_of(i, topics), count) for i in range(connections)]
    timeout = 120 + connections / 20 + connections * count / 1000
    try:
        with ServerProcess(cmd) as server:
            bench.reconnect = (server.port, "/ws")
            conns = await open_all(bench, subs, server.port, "/ws", False)
            await bench.wait(lambda: bench.opened >= connections, timeout, "opening")
            for conn in conns:
                conn.subscribe()
            await bench.wait(lambda: bench.subscribed == connections, timeout, "subscribing")
            await asyncio.to_thread(
                post, server.port, f"/publish?topics={topics}&count={count}&size={SIZE}"
            )
            await bench.wait(lambda: bench.complete == connections, timeout, "delivering")
            bench.reconnect = None
            conns = list(bench.conns)
        # The server is gone: every client is disconnected; messages keep coming.
        await asyncio.gather(*(c.closed for c in conns))
        backend = RedisBackend(url, prefix=prefix)
        history = HistoryLimit(1000)
        for seq in range(count, 2 * count):
            for t in range(topics):
                topic = f"t{t}"
                await backend.publish(topic, json.dumps(text(topic, seq, SIZE)), history=history)
        await backend.close()
        for sub in subs:
            sub.expected = 3 * count
            sub.done = sub.subscribed = False
        bench.complete = bench.opened = bench.subscribed = 0
        bench.conns.clear()
        with ServerProcess(cmd) as server:
            t0 = time.perf_counter()
            server.mark()
            bench.reconnect = (server.port, "/ws")
            # Every client connects and, on welcome, subscribes with each topic's last
            # cursor: a storm of resumes.
            await open_all(bench, subs, server.port, "/ws", False, auto_subscribe=True)
            live = asyncio.ensure_future(
                asyncio.to_thread(
                    post,
                    server.port,
                    f"/publish?topics={topics}&count={count}&size={SIZE}&start={2 * count}",
                )
            )
            await bench.wait(
                lambda: bench.complete == connections or live.done(), timeout, "resuming"
            )
            if live.done() and live.exception() is not None:
                raise RuntimeError(f"live publishing during the storm failed: {live.exception()}")
            await bench.wait(lambda: bench.complete == connections, timeout, "resuming")
            elapsed = time.perf_counter() - t0
            await live
            m = server.measure()
            bench.reconnect = None
            for conn in bench.conns:
                conn.transport.abort()
        # What the new server logged during the storm, most frequent first (topics and
        # numbers folded), so that a slow storm shows its cause.
        logged: dict[str, int] = {}
        for line in server.stderr.splitlines():
            if line.strip() and not line.startswith((" ", "Traceback")):
                key = re.sub(r"'[^']*'|\d+", "_", line)[:160]
                logged[key] = logged.get(key, 0) + 1
        for key, n in sorted(logged.items(), key=lambda kv: -kv[1])[:3]:
            bench.note(f"server log x{n}: {key}")
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        tmp.cleanup()
    expected = connections * PER_CONNECTION * 3 * count
    ok = bench.delivered == expected and not bench.lost and not bench.duplicates
    return Result(
        variant="ours-redis",
        scenario=f"storm {connections} conns x {PER_CONNECTION} of {topics} topics",
        ok=ok,
        error="; ".join(bench.errors)[:500],
        messages=bench.delivered,
        seconds=elapsed,
        server_cpu_s=m["cpu_s"],
        rss_growth_mb=m["rss_growth_mb"],
        extra={
            "storm_s": elapsed,
            "lost": bench.lost,
            "duplicates": bench.duplicates,
            "replayed_per_client": PER_CONNECTION * count,
            "retries": bench.retries,
            "reconnects": bench.reconnects,
            "close_codes": dict(bench.close_codes),
        },
    )


def table(results: list[Result]) -> str:
    rows = [
        "| scenario | variant | ok | msgs/s | vs socketio | server CPU s | B/subscription | B/connection |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    peers = {r.scenario: r.msgs_per_s for r in results if r.variant == "socketio" and r.ok}
    for r in results:
        if r.scenario.startswith("storm"):
            continue
        peer = peers.get(r.scenario)
        ratio = f"{r.msgs_per_s / peer:.1f}x" if peer and r.variant != "socketio" else ""
        rows.append(
            f"| {r.scenario} | {r.variant} | {'yes' if r.ok else 'NO'} | {r.msgs_per_s:,.0f} | "
            f"{ratio} | {r.server_cpu_s:.1f} | {r.extra.get('bytes_per_subscription', 0):,.0f} | "
            f"{r.extra.get('bytes_per_connection', 0):,.0f} |"
        )
    storms = [r for r in results if r.scenario.startswith("storm")]
    if storms:
        rows += [
            "",
            "| scenario | ok | resubscribe storm, s | messages delivered | lost | duplicated "
            "| subscribes retried after 503 | reconnects after an early close |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in storms:
            rows.append(
                f"| {r.scenario} | {'yes' if r.ok else 'NO'} | {r.seconds:.2f} | "
                f"{r.messages:,} | {r.extra.get('lost', '-')} | {r.extra.get('duplicates', '-')} | "
                f"{r.extra.get('retries', '-')} | {r.extra.get('reconnects', '-')} |"
            )
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    for _ in range(args.repeat):
        for variant in filter(None, args.variants.split(",")):
            try:
                count = args.count
                if variant == "socketio" and args.peer_count is not None:
                    count = args.peer_count
                result = await fanout(variant, args.connections, args.topics, count)
            except RuntimeError as exc:
                result = Result(variant, "fanout", False, str(exc)[:500])
            results.append(result)
            print(
                f"{result.variant:<9} {result.scenario}: ok={result.ok} "
                f"{result.msgs_per_s:,.0f} msgs/s, "
                f"{result.extra.get('bytes_per_subscription', 0):,.0f} B/subscription "
                f"{result.error[:200]}",
                flush=True,
            )
    if not args.no_storm and not (
        shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")
    ):
        print("storm: skipped (no redis-server on this machine)", flush=True)
    elif not args.no_storm:
        try:
            result = await storm(args.connections, args.topics, args.count)
        except RuntimeError as exc:
            result = Result("ours-redis", "storm", False, str(exc)[:500])
        results.append(result)
        print(
            f"storm: ok={result.ok} {result.seconds:.2f} s lost={result.extra.get('lost')} "
            f"dup={result.extra.get('duplicates')} retries={result.extra.get('retries')} "
            f"reconnects={result.extra.get('reconnects')} "
            f"closes={result.extra.get('close_codes')} "
            f"{result.error[:200]}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--count", type=int, default=100, help="rounds (messages per topic)")
    p.add_argument(
        "--peer-count",
        type=int,
        default=None,
        help="rounds for python-socketio (default: --count); its msgs/s is compared",
    )
    p.add_argument("--no-storm", action="store_true", help="skip the Redis storm")
    p.add_argument(
        "--variants", default="ours,socketio", help="fan-out variants to run ('' for none)"
    )
    args = bench_args(p.description or "", argv, repeat=1, parser=p)
    if args.tiny:
        args.connections, args.topics, args.count = 60, 20, 5
    raise_fd_limit()
    pin(0, CLIENT_CPU)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    results: list[Result] = runner(run(args))
    body = table(results)
    print(body)
    if not args.tiny:
        command = "python -m benchmarks.bench_subscriptions " + " ".join(argv or sys.argv[1:])
        write_markdown(
            args.out or RESULTS, "Subscriptions: many topics per connection", command, body
        )
    return exit_code(results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
