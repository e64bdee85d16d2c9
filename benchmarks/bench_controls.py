"""Connection caps: what counting every handshake costs, in this process and in Redis.

A server process (``python -m benchmarks.bench_controls server ...``) serves the
subscriptions protocol with a per-IP cap counted three ways, one variant per run:
``none`` (no cap), ``memory`` (``ConnectionCaps``: this process only) and
``redis`` (``RedisConnectionCaps`` on a private ``redis-server``: every
process; one script per accept and per close). The load client (this process)
opens ``--connections`` WebSockets from one claimed address (``X-Real-Ip``; the
server runs with ``xheaders=True``), 50 at a time, and waits for each
``welcome``: the accept rate. Then, with the cap at a tenth of that, the same
number again: the rate of handshakes answered (90% of them closed with 4429),
the flood of the issue. Every answer is checked (a welcome, or a 4429 close;
the number kept equals the cap). Same-run ratios against ``none``; the
variants take turns, ``--repeat`` times (3), and the best run of each is kept.

``python -m benchmarks.bench_controls`` writes ``benchmarks/results/controls.md``
(2,000 connections); ``--tiny`` runs 40 and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import (
    BENCH_DIR,
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    Result,
    bench_args,
    best_of,
    exit_code,
    pin,
    raise_fd_limit,
    write_markdown,
)

RESULTS = BENCH_DIR / "results" / "controls.md"
VARIANTS = ("none", "memory", "redis")
BATCH = 50
ADDRESS = "203.0.113.9"


async def serve(variant: str, cap: int, redis_url: str) -> None:
    """The server of one variant: prints ``READY <port>``, serves until SIGTERM."""
    import socket

    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    import tornado.websocket

    from tornado_longconn import BroadcastHub, MemoryBackend
    from tornado_longconn.subscriptions import SubscriptionMixin

    settings: dict[str, Any] = {}
    caps: Any = None
    backend: Any = None
    if variant == "redis":
        from tornado_longconn.backends.redis import RedisBackend
        from tornado_longconn.caps_redis import RedisConnectionCaps

        backend = RedisBackend(redis_url, prefix="bench:caps:")
        await backend.start()
        caps = RedisConnectionCaps(backend, ttl=30)
        await caps.start()
        settings["longconn_connection_caps"] = caps

    class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
        max_connections_per_ip = None if variant == "none" else cap

        def initialize(self, hub: BroadcastHub) -> None:
            self.subscription_hub = hub

    hub = BroadcastHub(MemoryBackend())
    app = tornado.web.Application([(r"/ws", Live, {"hub": hub})], **settings)
    server = tornado.httpserver.HTTPServer(app, xheaders=True)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET, backlog=1024)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.stop()
    await hub.close(spread=0)
    await server.close_all_connections()
    if caps is not None:
        await caps.close()
        await backend.close()


async def storm(port: int, count: int) -> tuple[float, list[Any], int, int]:
    """Open ``count`` WebSockets from one address, ``BATCH`` at a time.

    Returns the seconds taken, the connections kept open, and how many were
    welcomed and how many closed with 4429.
    """
    import websockets
    from websockets.exceptions import ConnectionClosed

    url = f"ws://127.0.0.1:{port}/ws"
    headers = {"X-Real-Ip": ADDRESS}

    async def one() -> tuple[Any, int | None]:
        ws = await websockets.connect(url, additional_headers=headers, open_timeout=30)
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        except ConnectionClosed:
            return None, ws.close_code
        return (ws, None) if first.get("type") == "welcome" else (None, -1)

    kept: list[Any] = []
    refused = 0
    t0 = time.perf_counter()
    for start in range(0, count, BATCH):
        results = await asyncio.gather(*(one() for _ in range(min(BATCH, count - start))))
        kept += [ws for ws, _ in results if ws is not None]
        refused += sum(1 for ws, code in results if ws is None and code == 4429)
    return time.perf_counter() - t0, kept, len(kept), refused


async def close_all(conns: list[Any]) -> None:
    for start in range(0, len(conns), BATCH):
        await asyncio.gather(*(ws.close() for ws in conns[start : start + BATCH]))


def start_server(variant: str, cap: int, redis_url: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_controls", "server",
         json.dumps([variant, cap, redis_url])],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.stdout is not None
    pin(proc.pid, SERVER_CPU)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.split()[1])


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_variant(variant: str, count: int, redis_url: str) -> list[Result]:
    results = []
    # accepts: the cap far above the load (every handshake counted, none refused)
    proc, port = start_server(variant, count * 10, redis_url)
    try:
        seconds, welcomed, refused = asyncio.run(_storm_and_close(port, count))
        ok = welcomed == count and refused == 0
        results.append(
            Result(variant, f"{count} accepts", ok, "" if ok else f"{welcomed}/{refused}",
                   messages=count, seconds=seconds)
        )  # fmt: skip
    finally:
        stop_server(proc)
    if variant == "none":
        return results
    cap = max(1, count // 10)
    proc, port = start_server(variant, cap, redis_url)
    try:
        seconds, welcomed, refused = asyncio.run(_storm_and_close(port, count))
        ok = welcomed == cap and refused == count - cap
        results.append(
            Result(variant, f"{count} handshakes, cap {cap}", ok,
                   "" if ok else f"{welcomed}/{refused}", messages=count, seconds=seconds)
        )  # fmt: skip
    finally:
        stop_server(proc)
    return results


async def _storm_and_close(port: int, count: int) -> tuple[float, int, int]:
    """:func:`storm`, then close what it kept (not timed)."""
    seconds, kept, welcomed, refused = await storm(port, count)
    await close_all(kept)
    return seconds, welcomed, refused


async def store_cost(redis_url: str, count: int) -> dict[str, float]:
    """Microseconds per accept + close of each store alone (no WebSocket), awaited one by one."""
    from tornado_longconn.backends.redis import RedisBackend
    from tornado_longconn.caps_redis import RedisConnectionCaps
    from tornado_longconn.ratelimit import ConnectionCaps

    backend = RedisBackend(redis_url, prefix="bench:store:")
    await backend.start()
    redis_caps = RedisConnectionCaps(backend, ttl=30)
    await redis_caps.start()
    cost: dict[str, float] = {}
    try:
        for name, store in (("memory", ConnectionCaps()), ("redis", redis_caps)):
            wanted = [("ip", ADDRESS, count + 1), ("user", "ann", count + 1)]
            t0 = time.perf_counter()
            held = []
            for _ in range(count):
                hold, refused = await store.acquire_connection(wanted)
                assert refused is None
                held.append(hold)
            for hold in held:
                store.release_connection(hold)
            if name == "redis":  # the releases are tasks: wait for them
                while redis_caps.counts["round_trips"] < 2 * count + 1:
                    await asyncio.sleep(0.001)
                assert await redis_caps.count("ip", ADDRESS) == 0
            cost[name] = (time.perf_counter() - t0) / count * 1e6
        cost["round_trips_per_connection"] = (redis_caps.counts["round_trips"] - 1) / count
    finally:
        await redis_caps.close()
        await backend.close()
    return cost


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        variant, cap, redis_url = json.loads(argv[1])
        asyncio.run(serve(variant, int(cap), redis_url))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    args = bench_args("", argv, repeat=3, parser=parser)
    count = 40 if args.tiny else args.connections
    pin(0, CLIENT_CPU)
    raise_fd_limit()
    from benchmarks.bench_redis import start_redis

    redis_proc, redis_port, tmp = start_redis()
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        runs = [
            r for _ in range(args.repeat) for variant in VARIANTS
            for r in run_variant(variant, count, url)
        ]  # fmt: skip
        results = best_of(runs)
        cost = asyncio.run(store_cost(url, count))
    finally:
        redis_proc.kill()
        redis_proc.wait()
        tmp.cleanup()
    base = next(r for r in results if r.variant == "none")
    for r in results:
        ratio = r.msgs_per_s / base.msgs_per_s if base.msgs_per_s else 0.0
        print(
            f"{r.scenario} / {r.variant}: {r.msgs_per_s:,.0f} handshakes/s "
            f"(x{ratio:.2f} of no cap) {'ok' if r.ok else 'FAILED ' + r.error}"
        )
    print(
        f"the store alone, accept + close of one connection (ip and user caps): memory "
        f"{cost['memory']:.1f} us, redis {cost['redis']:.1f} us "
        f"({cost['round_trips_per_connection']:.2f} round trips)"
    )
    if not args.tiny:
        rows = "".join(
            f"| {r.scenario} | {r.variant} | {'yes' if r.ok else 'NO'} | {r.seconds * 1000:,.0f} | "
            f"{r.msgs_per_s:,.0f} | {r.msgs_per_s / base.msgs_per_s:.2f} |\n"
            for r in results
        )
        body = (
            "| scenario | variant | verified | time ms | handshakes/s | ratio to no cap |\n"
            "|---|---|---|---:|---:|---:|\n" + rows + "\n"
            "One address, 50 handshakes at a time, each waiting for its `welcome` (or its "
            "4429 close). `memory`: `ConnectionCaps` (this process); `redis`: "
            "`RedisConnectionCaps` on a private redis-server (one script per accept and per "
            f"close). Best of {args.repeat} runs per row, the variants taking turns. The "
            "load client (Python `websockets`, one process) is the bottleneck at these "
            "rates: compare the ratios, and read differences of a few percent as noise.\n\n"
            f"The store alone (no WebSocket), {count:,} connections counted in under an IP "
            f"and a user cap, then out, awaited one by one: `memory` {cost['memory']:.1f} us "
            f"per connection, `redis` {cost['redis']:.1f} us "
            f"({cost['round_trips_per_connection']:.2f} round trips per connection: one "
            "script in, one out).\n"
        )
        write_markdown(
            args.out or RESULTS,
            "Controls: connection caps per handshake",
            "python -m benchmarks.bench_controls"
            + (f" --connections {args.connections}" if args.connections != 2000 else ""),
            body,
        )
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
