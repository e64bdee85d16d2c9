"""Memory per connection and idle CPU: HeartbeatMixin, + a group membership, + 10 subscriptions.

Run: ``python -m benchmarks.bench_memory [--tiny] [--connections N] [--hold S]`` from the
repository root.

10,000 idle WebSocket connections (``--tiny``: 200, held 2 s) with a heartbeat every
second (timeout 10 s), held 20 s, for each variant in the same run, one after the other,
each server in its own process (CPU 0) and the harness load client in another (CPU 1);
the client answers every ping:

* ``ours``: Tornado + ``HeartbeatMixin``;
* ``ours+member``: the same, each connection joining one ``BroadcastGroup`` in ``open()``
  (its ``BackpressureWriter``, membership and close hooks);
* ``ours+10subs``: ``HeartbeatMixin`` + ``SubscriptionMixin``, each connection joining 10
  of 1,000 topics of the hub in ``open()`` (server-side joins through
  ``subscription_group``: the memberships a client's 10 ``subscribe`` requests make,
  without the requests);
* ``tornado``: Tornado's ``websocket_ping_interval`` (one task per connection);
* ``websockets``: the ``websockets`` library's keepalive (one task per connection).

Measured by the server itself, once every connection is open and one garbage collection
has run (so the handshakes' garbage is not counted): CPU seconds over the hold, the RSS
per connection against the RSS before the first connection (at the end of the hold), and
the full (generation 2) garbage collections during the hold, per minute. "per member" is
``ours+member`` minus ``ours``; "per subscription" is ``(ours+10subs - ours) / 10``.

Verified: every connection opened, none closed during the hold, about one ping per
connection per second answered. Results: ``benchmarks/results/memory.md``.

The module is also the server: ``python -m benchmarks.bench_memory --serve VARIANT N HOLD``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from typing import Any

from benchmarks.harness import (
    BENCH_DIR,
    ClientConfig,
    Result,
    ServerProcess,
    bench_args,
    emit,
    exit_code,
    raise_fd_limit,
    run_client,
    serve_tornado,
    serve_until_sigterm,
    write_markdown,
)
from benchmarks.servers.heartbeat_server import cpu_seconds, rss_bytes

VARIANTS = ("ours", "ours+member", "ours+10subs", "tornado", "websockets")
INTERVAL = 1.0
TIMEOUT = 10.0
TOPICS = 1000
SUBSCRIPTIONS = 10

# ---------------------------------------------------------------------------- server


class Meter:
    """Counts connections; once all are open, collects garbage, then measures the hold."""

    def __init__(self, connections: int, hold: float) -> None:
        self.connections = connections
        self.hold = hold
        self.opened = 0
        self.closed = 0
        self.rss_before = rss_bytes()

    def on_open(self) -> None:
        self.opened += 1
        if self.opened == self.connections:
            asyncio.get_running_loop().create_task(self._measure())

    def on_close(self) -> None:
        self.closed += 1

    async def _measure(self) -> None:
        await asyncio.sleep(0.5)  # the last handshakes' callbacks
        gc.collect()
        closed0 = self.closed
        rss0, cpu0, t0 = rss_bytes(), cpu_seconds(), time.monotonic()
        gc0 = [g["collections"] for g in gc.get_stats()]
        await asyncio.sleep(self.hold)
        cpu1, rss1, t1 = cpu_seconds(), rss_bytes(), time.monotonic()
        gc1 = [g["collections"] for g in gc.get_stats()]
        emit(
            "STATS",
            {
                "connections": self.opened,
                "cpu_s": cpu1 - cpu0,
                "seconds": t1 - t0,
                "rss_open_mb": rss0 / 1e6,
                "rss_per_conn": (rss1 - self.rss_before) / max(1, self.opened),
                "closed_during_hold": self.closed - closed0,
                "gc_collections": [b - a for a, b in zip(gc0, gc1, strict=True)],
                "gc_tracked": len(gc.get_objects()),
            },
        )


def tornado_app(variant: str, meter: Meter) -> Any:
    import tornado.web
    import tornado.websocket

    from tornado_longconn import BroadcastHub, HeartbeatMixin, SubscriptionMixin

    hub = BroadcastHub()

    class Plain(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            meter.on_open()

        def on_message(self, message: str | bytes) -> None:
            pass

        def on_close(self) -> None:
            meter.on_close()

    class Ours(HeartbeatMixin, Plain):
        heartbeat_interval = INTERVAL
        heartbeat_timeout = TIMEOUT

    room = hub.group("room")

    class Member(Ours):
        def open(self) -> None:
            room.join(self)
            super().open()

    class Subscriber(HeartbeatMixin, SubscriptionMixin, tornado.websocket.WebSocketHandler):
        heartbeat_interval = INTERVAL
        heartbeat_timeout = TIMEOUT
        subscription_hub = hub

        def check_origin(self, origin: str) -> bool:
            return True

        def open(self, *args: str, **kwargs: str) -> None:
            super().open(*args, **kwargs)
            first = meter.opened * SUBSCRIPTIONS
            for k in range(SUBSCRIPTIONS):
                self.subscription_group(f"t{(first + k) % TOPICS}").join(self)
            meter.on_open()

        def on_close(self) -> None:
            meter.on_close()

    handler: type[Any] = {"ours": Ours, "ours+member": Member, "ours+10subs": Subscriber}.get(
        variant, Plain
    )
    settings: dict[str, Any] = {}
    if variant == "tornado":
        settings = {"websocket_ping_interval": INTERVAL, "websocket_ping_timeout": INTERVAL}
    return tornado.web.Application([("/", handler)], **settings)


def serve(variant: str, connections: int, hold: float) -> None:
    limit = raise_fd_limit()
    if limit < connections + 100:
        raise SystemExit(f"open-files limit {limit} is too low for {connections} connections")
    meter = Meter(connections, hold)
    if variant != "websockets":
        serve_tornado(tornado_app(variant, meter))
        return
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as ws_serve

    async def handler(ws: ServerConnection) -> None:
        meter.on_open()
        try:
            await ws.wait_closed()
        finally:
            meter.on_close()

    servers: list[Any] = []

    async def start() -> int:
        server = await ws_serve(
            handler,
            "127.0.0.1",
            0,
            ping_interval=INTERVAL,
            ping_timeout=TIMEOUT,
            compression=None,
            backlog=4096,
        )
        servers.append(server)
        return int(next(iter(server.sockets)).getsockname()[1])

    serve_until_sigterm(start)


# ---------------------------------------------------------------------------- benchmark


def run_variant(variant: str, connections: int, hold: float) -> Result:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--serve", variant]
    cmd += [str(connections), str(hold)]
    cfg = ClientConfig(
        path="/",
        connections=connections,
        verify="count",
        duration=hold + max(4.0, 0.6 * hold),
        timeout=max(60.0, connections / 50),
    )
    try:
        with ServerProcess(cmd, ready_timeout=60.0) as server:
            report = run_client(cfg.with_port(server.port))
            stats: dict[str, Any] = server.report("STATS", {})
    except RuntimeError as exc:
        return Result(variant, "idle", ok=False, error=str(exc)[-300:], extra={"stats": {}})
    errors = list(report.get("errors") or [])
    if not stats:
        errors.append("no STATS from the server")
    else:
        if stats["connections"] != connections:
            errors.append(f"server saw {stats['connections']} connections")
        if stats["closed_during_hold"]:
            errors.append(f"{stats['closed_during_hold']} connections closed during the hold")
    pings = int(report.get("pings", 0))
    if pings < 0.8 * connections * hold / INTERVAL:
        errors.append(f"only {pings} pings answered")
    return Result(
        variant,
        "idle",
        ok=not errors,
        error="; ".join(errors),
        messages=pings,
        seconds=float(stats.get("seconds", 0.0)),
        server_cpu_s=float(stats.get("cpu_s", 0.0)),
        client=report,
        extra={"stats": stats},
    )


def table(rows: list[Result]) -> str:
    by = {r.variant: r.extra["stats"] for r in rows}
    ws_cpu = (by.get("websockets") or {}).get("cpu_s")
    head = [
        "variant",
        "verified",
        "RSS/conn KiB",
        "vs websockets",
        "server CPU s (hold)",
        "CPU vs websockets",
        "full GCs / min",
        "GC-tracked objects",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    ws_rss = (by.get("websockets") or {}).get("rss_per_conn")
    for r in rows:
        s = r.extra["stats"]
        ok = "yes" if r.ok else "NO: " + r.error[:100]
        if not s:
            lines.append(f"| {r.variant} | {ok} |" + " - |" * (len(head) - 2))
            continue
        per_min = s["gc_collections"][2] / s["seconds"] * 60 if s["seconds"] else 0.0
        cells = [
            r.variant,
            ok,
            f"{s['rss_per_conn'] / 1024:.2f}",
            f"{s['rss_per_conn'] / ws_rss:.2f}x" if ws_rss else "-",
            f"{s['cpu_s']:.2f}",
            f"{s['cpu_s'] / ws_cpu:.2f}x" if ws_cpu else "-",
            f"{per_min:.1f}",
            f"{s['gc_tracked']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[Result]) -> str:
    by = {r.variant: r.extra["stats"] for r in rows}

    def rss(name: str) -> float | None:
        value = (by.get(name) or {}).get("rss_per_conn")
        return None if value is None else float(value)

    base, member, subs = rss("ours"), rss("ours+member"), rss("ours+10subs")
    out = []
    if base is not None and member is not None:
        out.append(f"per member (ours+member - ours): {member - base:,.0f} B")
    if base is not None and subs is not None:
        out.append(
            f"per subscription ((ours+10subs - ours) / {SUBSCRIPTIONS}): "
            f"{(subs - base) / SUBSCRIPTIONS:,.0f} B"
        )
    return "\n".join(f"* {line}" for line in out) + "\n"


NOTES = """
Notes:

* RSS/conn is the server's RSS at the end of the hold minus its RSS before the first
  connection, divided by the connections: Tornado's and the library's objects, the
  kernel-independent part of a connection. One garbage collection runs once every
  connection is open, before the hold.
* "full GCs / min": generation-2 collections during the hold. Each walks every tracked
  object ("GC-tracked objects", counted at the end of the hold), so fewer tracked
  objects per connection make each one cheaper, and fewer objects surviving a heartbeat
  interval make them rarer.
* The machine is a shared 2-core VM: compare ratios within a run.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--serve``, one server variant)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve(argv[1], int(argv[2]), float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = bench_args("", argv, parser=parser)
    connections, hold = args.connections, args.hold
    if args.tiny:
        connections, hold = 200, 2.0
    variants = tuple(args.only.split(",")) if args.only else VARIANTS
    rows = []
    for variant in variants:
        row = run_variant(variant, connections, hold)
        rows.append(row)
        s = row.extra["stats"]
        print(
            f"{variant:12} rss/conn={s.get('rss_per_conn', 0) / 1024:.2f}KiB "
            f"cpu={s.get('cpu_s', float('nan')):.2f}s gc={s.get('gc_collections')} "
            f"errors={row.error or '-'}",
            flush=True,
        )
    body = (
        f"{connections:,} idle WebSocket connections, heartbeat every {INTERVAL:g} s "
        f"(timeout {TIMEOUT:g} s), held {hold:g} s, every variant in the same run.\n\n"
        + table(rows)
        + "\n"
        + summary(rows)
        + NOTES
    )
    print(body)
    if not args.tiny:
        out = args.out or BENCH_DIR / "results" / "memory.md"
        write_markdown(
            out,
            "Memory benchmark: bytes per connection, member and subscription; idle CPU",
            "python -m benchmarks.bench_memory"
            + ("" if connections == 10_000 else f" --connections {connections}"),
            body,
        )
        print(f"wrote {out}")
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
