"""Presence on Redis: a join storm across two processes, and the reap of a dead one.

Two worker processes (``python -m benchmarks.bench_presence worker ...``) share a
private ``redis-server``. Each makes a ``RedisBackend`` and a ``RedisPresence``
and watches one topic; at the same signal each reports ``joins / 2`` members
joining that topic (``join_nowait`` back to back, as handlers do when a crowd
subscribes at once; users ``u0`` to ``u999``), then waits until it has seen the
join event of every member of both processes and reads the counts once.
Measured, per worker: time to its reports being sent, time to every join event
seen (the count is then correct here: it is read and checked), and round trips
to Redis; for the whole run Redis commands per join from ``INFO commandstats``
(``EVALSHA`` calls, and every command the scripts ran). Then the second worker is
killed with SIGKILL and the first measures the time until every one of the dead
worker's members has left (one ``leave`` event each, reason ``expired``) with a
2 s TTL.

``python -m benchmarks.bench_presence`` writes ``benchmarks/results/presence.md``
(10,000 joins); ``--tiny`` runs 200 joins and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import BENCH_DIR, ROOT, Result, bench_args, exit_code, write_markdown

RESULTS = BENCH_DIR / "results" / "presence.md"
TOPIC = "room:storm"
USERS = 1000


async def worker(url: str, prefix: str, index: int, joins: int, total: int, ttl: float) -> None:
    """One process: watch, join ``joins`` members at "go", report when all ``total`` are seen."""
    from tornado_longconn.backends.redis import RedisBackend
    from tornado_longconn.presence import Member, PresenceEvent
    from tornado_longconn.presence_redis import RedisPresence

    backend = RedisBackend(url, prefix=prefix)
    await backend.start()
    store = RedisPresence(backend, ttl=ttl)
    await store.start()
    joined: set[str] = set()
    expired: set[str] = set()
    changed = asyncio.Event()

    def on_event(event: PresenceEvent) -> None:
        assert event.member is not None
        if event.kind == "join":
            joined.add(event.member.client)
        elif event.kind == "leave" and event.reason == "expired":
            expired.add(event.member.client)
        changed.set()

    async def until(predicate: Any) -> None:
        while not predicate():
            changed.clear()
            await changed.wait()

    await store.watch(TOPIC, on_event)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("READY", flush=True)
    assert (await reader.readline()).strip() == b"go"
    t0 = time.perf_counter()
    trips0 = store.counts["round_trips"]
    for i in range(joins):
        n = index * joins + i
        member = Member(f"c{n}", f"u{n % USERS}", {"n": n}, time.time(), "websocket")
        store.join_nowait(TOPIC, member)
    await store.settled()
    sent = time.perf_counter() - t0
    trips = store.counts["round_trips"] - trips0
    await until(lambda: len(joined) >= total)
    seen = time.perf_counter() - t0
    stats = await store.presence_stats(TOPIC)
    # The whole member list, paged as the protocol's presence request pages it
    # (limit 1000): time, pages, and the bytes of the answers' member objects.
    q0 = time.perf_counter()
    cursor: str | None = None
    listed: set[str] = set()
    pages = answer_bytes = 0
    while True:
        page = await store.presence(TOPIC, cursor=cursor, limit=1000)
        pages += 1
        answer_bytes += len(json.dumps([m.to_json() for m in page.members]))
        listed.update(m.client for m in page.members)
        cursor = page.cursor
        if cursor is None:
            break
    query_s = time.perf_counter() - q0
    report: dict[str, Any] = {
        "query_s": query_s,
        "query_pages": pages,
        "query_bytes": answer_bytes,
        "listed": len(listed),
        "sent_s": sent,
        "seen_s": seen,
        "round_trips": trips,
        "connections": stats.connections,
        "users": stats.users,
        "events": len(joined),
    }
    print("REPORT " + json.dumps(report), flush=True)
    line = (await reader.readline()).strip()
    if line == b"killed":  # the other worker was killed: wait for its members to leave
        t1 = time.perf_counter()
        await until(lambda: len(expired) >= total - joins)
        after = await store.presence_stats(TOPIC)
        print(
            "REPORT "
            + json.dumps(
                {
                    "reap_s": time.perf_counter() - t1,
                    "expired": len(expired),
                    "connections": after.connections,
                    "reaped_here": store.counts["reaped"],
                }
            ),
            flush=True,
        )
        await reader.readline()
    await store.close()
    await backend.close()


def start_worker(url: str, prefix: str, index: int, joins: int, total: int, ttl: float) -> Any:
    args = json.dumps([url, prefix, index, joins, total, ttl])
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_presence", "worker", args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def read_line(proc: Any, kind: str) -> str:
    line: str = proc.stdout.readline().decode().strip()
    if not line.startswith(kind):
        raise RuntimeError(f"worker said {line!r}, expected {kind}")
    return line[len(kind) :].strip()


def commandstats(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("commandstats")
    client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def socketio_joins(url: str, joins: int) -> dict[str, Any]:
    """python-socketio's ``enter_room`` on its Redis manager, ``joins`` times, for comparison.

    Its rooms live in the process that entered them (the Redis manager carries
    emits between processes, not membership): Redis sees no command, and another
    process cannot count or list the room's members.
    """
    import socketio  # type: ignore[import-untyped,unused-ignore]

    manager = socketio.AsyncRedisManager(url)
    manager.set_server(socketio.AsyncServer(client_manager=manager))
    manager.initialize()
    sids = [await manager.connect(f"e{n}", "/") for n in range(joins)]  # local clients
    before = commandstats(url)
    t0 = time.perf_counter()
    for n, sid in enumerate(sids):
        await manager.enter_room(sid, "/", TOPIC, eio_sid=f"e{n}")
    elapsed = time.perf_counter() - t0
    after = commandstats(url)
    commands = sum(after.get(k, 0) - before.get(k, 0) for k in after) - 1  # INFO itself
    members = len(list(manager.get_participants("/", TOPIC)))
    return {"seconds": elapsed, "commands": commands, "members_here": members}


def run(joins: int, ttl: float) -> tuple[Result, dict[str, Any]]:
    from benchmarks.bench_redis import start_redis

    redis_proc, port, tmp = start_redis()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"bench:{secrets.token_hex(3)}:"
    half = joins // 2
    workers = [start_worker(url, prefix, i, half, 2 * half, ttl) for i in range(2)]
    try:
        for w in workers:
            read_line(w, "READY")
        before = commandstats(url)
        for w in workers:
            w.stdin.write(b"go\n")
            w.stdin.flush()
        reports = [json.loads(read_line(w, "REPORT")) for w in workers]
        after = commandstats(url)
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait()
        workers[0].stdin.write(b"killed\n")
        workers[0].stdin.flush()
        reap = json.loads(read_line(workers[0], "REPORT"))
        workers[0].stdin.write(b"done\n")
        workers[0].stdin.flush()
        workers[0].wait(timeout=30)
        try:
            peer = asyncio.run(socketio_joins(url, joins))
        except ImportError:
            peer = None
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        redis_proc.kill()
        redis_proc.wait()
        tmp.cleanup()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    total = 2 * half
    evalsha = delta.get("evalsha", 0)
    # commands the scripts ran (every command but EVALSHA and the refresh loop's own)
    inner = sum(delta.values()) - evalsha
    ok = all(
        r["connections"] == total
        and r["users"] == min(USERS, total)
        and r["events"] == total
        and r["listed"] == total
        for r in reports
    ) and (reap["expired"] == half and reap["connections"] == half)
    detail = {
        "joins": total,
        "sent_s": max(r["sent_s"] for r in reports),
        "seen_s": max(r["seen_s"] for r in reports),
        "round_trips": sum(r["round_trips"] for r in reports),
        "evalsha_per_join": evalsha / total,
        "commands_per_join": inner / total,
        "delta": delta,
        "reap_s": reap["reap_s"],
        "ttl": ttl,
        "expired": reap["expired"],
        "query_s": max(r["query_s"] for r in reports),
        "query_pages": reports[0]["query_pages"],
        "query_bytes": reports[0]["query_bytes"],
        "peer": peer,
    }
    result = Result(
        "ours", f"join storm {total}", ok, "" if ok else json.dumps([reports, reap])[:300],
        messages=total, seconds=detail["seen_s"],
    )  # fmt: skip
    return result, detail


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        asyncio.run(worker(*json.loads(argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--joins", type=int, default=10_000)
    parser.add_argument("--ttl", type=float, default=2.0)
    args = bench_args("", argv, repeat=1, parser=parser)
    joins = 200 if args.tiny else args.joins
    result, d = run(joins, args.ttl)
    print(
        f"{d['joins']} joins on 2 processes: sent in {d['sent_s']:.3f} s, every join seen "
        f"everywhere (count correct) in {d['seen_s']:.3f} s; {d['round_trips']} round trips "
        f"({d['round_trips'] / d['joins']:.4f} per join), {d['evalsha_per_join']:.2f} EVALSHA and "
        f"{d['commands_per_join']:.1f} commands per join; {d['expired']} members of the killed "
        f"process left in {d['reap_s']:.2f} s after the kill (TTL {d['ttl']:g} s); the whole "
        f"list in {d['query_s'] * 1000:.0f} ms ({d['query_pages']} pages, "
        f"{d['query_bytes']:,} B of members)"
    )
    peer = d["peer"]
    if peer is not None:
        print(
            f"python-socketio enter_room on AsyncRedisManager: {d['joins']} joins in "
            f"{peer['seconds'] * 1000:.0f} ms, {peer['commands']} Redis commands, "
            f"{peer['members_here']} members visible in this process only"
        )
    if not args.tiny:
        ok = "yes" if result.ok else "NO"
        body = (
            "| scenario | variant | verified | time ms | round trips | round trips per join | "
            "EVALSHA per join | commands per join |\n"
            "|---|---|---|---:|---:|---:|---:|---:|\n"
            f"| {d['joins']:,} joins on 2 processes: every join seen everywhere, counts exact | "
            f"ours | {ok} | {d['seen_s'] * 1000:,.0f} | {d['round_trips']} | "
            f"{d['round_trips'] / d['joins']:.4f} | {d['evalsha_per_join']:.2f} | "
            f"{d['commands_per_join']:.1f} |\n"
            f"| SIGKILL of one: its {d['expired']:,} members left everywhere (TTL {d['ttl']:g} s) | "
            f"ours | {ok} | {d['reap_s'] * 1000:,.0f} | - | - | - | - |\n"
            f"| the {d['joins']:,}-member list read whole ({d['query_pages']} pages of 1,000; "
            f"{d['query_bytes']:,} B of member objects) | ours | {ok} | "
            f"{d['query_s'] * 1000:,.0f} | {d['query_pages']} | - | - | - |\n"
        )
        if peer is not None:
            body += (
                f"| {d['joins']:,} `enter_room` on python-socketio's `AsyncRedisManager` "
                f"(membership in the entering process only) | socketio | - | "
                f"{peer['seconds'] * 1000:,.0f} | 0 | 0 | 0 | "
                f"{peer['commands'] / d['joins']:.1f} |\n"
            )
        body += (
            "\n"
            f"Reports of the storm sent (last process) after {d['sent_s'] * 1000:,.0f} ms. "
            f"Redis commands during the storm (`INFO commandstats` delta): "
            f"{json.dumps(d['delta'], sort_keys=True)}.\n"
        )
        write_markdown(
            args.out or RESULTS,
            "Presence: join storm on Redis",
            "python -m benchmarks.bench_presence"
            + (f" --joins {args.joins}" if args.joins != 10_000 else ""),
            body,
        )
    return exit_code([result])


if __name__ == "__main__":
    sys.exit(main())
