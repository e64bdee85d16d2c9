"""The command line: ``python -m tornado_longconn`` (or ``longconn``).

Subcommands (``--help`` on each for its options):

* ``tail URL TOPIC [TOPIC ...]`` -- print the messages of topics as JSON lines,
  from a cursor (``--cursor``), reconnecting and resuming as the client does;
  a resync is printed as ``{"type": "resync", ...}``. ``--count N`` stops after
  N messages.
* ``publish URL TOPIC DATA`` -- publish DATA (JSON, else a string) and print
  its cursor.
* ``upload URL FILE`` -- upload a file over the WebSocket upload protocol with
  progress on stderr (``--resume ID`` continues an earlier upload); prints the
  result as JSON.
* ``metrics URL`` -- print a server's Prometheus ``/metrics``.

Presence (who is subscribed to a topic) is not part of the library yet, so
there is no subcommand for it. Exit status: 0 on success, 1 on an error
(printed to stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from .client import ClientError, Subscription, TopicMessage, connect
from .client_http import http_request
from .client_upload import upload

__all__ = ["main"]


def _headers(values: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or ():
        key, sep, rest = value.partition(":")
        if not sep:
            raise SystemExit(f"--header wants 'Name: value', not {value!r}")
        out[key.strip()] = rest.strip()
    return out


def _cursors(values: Sequence[str] | None, topics: Sequence[str]) -> dict[str, str | None]:
    """``--cursor C`` (every topic) or ``--cursor TOPIC=C`` (one topic)."""
    out: dict[str, str | None] = dict.fromkeys(topics)
    for value in values or ():
        topic, sep, cursor = value.rpartition("=")
        if sep:
            if topic not in out:
                raise SystemExit(f"--cursor names {topic!r}, which is not tailed")
            out[topic] = cursor or None
        else:
            out = dict.fromkeys(topics, value)
    return out


def _event_json(event: Any) -> str:
    if isinstance(event, TopicMessage):
        obj: dict[str, Any] = {"topic": event.topic, "cursor": event.cursor}
        if event.binary:
            obj["data"] = base64.b64encode(event.data).decode("ascii")
            obj["binary"] = True
        else:
            obj["data"] = event.data
    else:
        obj = {"type": "resync", "topic": event.topic, "cursor": event.cursor}
        obj["reason"] = event.reason
    return json.dumps(obj, ensure_ascii=False)


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sse_url": args.sse_url,
        "poll_url": args.poll_url,
        "publish_url": args.publish_url,
        "headers": _headers(args.header),
        "open_timeout": args.timeout,
    }


async def _tail(args: argparse.Namespace) -> int:
    cursors = _cursors(args.cursor, args.topics)
    async with connect(args.url, **_client_options(args)) as client:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)

        async def pump(sub: Subscription) -> None:
            try:
                async for event in sub:
                    await queue.put(event)
            except ClientError as exc:
                await queue.put(exc)

        subs = [await client.subscribe(t, cursor=c) for t, c in cursors.items()]
        pumps = [asyncio.ensure_future(pump(sub)) for sub in subs]
        seen = 0
        try:
            while args.count is None or seen < args.count:
                event = await queue.get()
                if isinstance(event, ClientError):
                    raise event
                print(_event_json(event), flush=True)
                if isinstance(event, TopicMessage):
                    seen += 1
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    return 0


def _data(text: str, raw: bool) -> Any:
    if raw:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _publish(args: argparse.Namespace) -> int:
    async with connect(args.url, **_client_options(args)) as client:
        cursor = await client.publish(args.topic, _data(args.data, args.raw))
    print(json.dumps({"topic": args.topic, "cursor": cursor}), flush=True)
    return 0


async def _upload(args: argparse.Namespace) -> int:
    quiet = args.quiet

    def progress(done: int, total: int) -> None:
        if not quiet:
            percent = 100.0 if total == 0 else 100.0 * done / total
            print(f"\r{done}/{total} bytes ({percent:5.1f}%)", end="", file=sys.stderr, flush=True)

    def ready(upload_id: str) -> None:
        if not quiet:
            print(f"upload id {upload_id} (resume with --resume {upload_id})", file=sys.stderr)

    result = await upload(
        args.url,
        args.file,
        upload_id=args.resume,
        headers=_headers(args.header),
        on_progress=progress,
        on_ready=ready,
        retries=args.retries,
    )
    if not quiet:
        print(file=sys.stderr)
    print(json.dumps({"id": result.id, "size": result.size, "sha256": result.sha256}), flush=True)
    return 0


async def _metrics(args: argparse.Namespace) -> int:
    answer = await asyncio.wait_for(
        http_request(args.url, headers=_headers(args.header)), args.timeout
    )
    if answer.status != 200:
        print(f"HTTP {answer.status}: {answer.body[:200]!r}", file=sys.stderr)
        return 1
    sys.stdout.write(answer.body.decode("utf-8", "replace"))
    sys.stdout.flush()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longconn",
        description="Talk to a tornado-longconn server: tail, publish, upload, metrics.",
        epilog="Presence is not part of the library yet: there is no presence subcommand.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def connection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("url", help="the WebSocket endpoint (ws:// or wss://)")
        sub.add_argument("--sse-url", help="multi-topic SSE endpoint (fallback)")
        sub.add_argument("--poll-url", help="multi-topic long-poll endpoint (fallback)")
        sub.add_argument("--publish-url", help="HTTP publish endpoint (used on SSE/long-poll)")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds to connect")

    def header(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--header", action="append", metavar="'NAME: VALUE'", help="request header"
        )

    tail = commands.add_parser("tail", help="print the messages of topics as JSON lines")
    connection(tail)
    header(tail)
    tail.add_argument("topics", nargs="+", metavar="TOPIC")
    tail.add_argument(
        "--cursor",
        action="append",
        metavar="[TOPIC=]CURSOR",
        help="resume after CURSOR (every topic, or TOPIC only); default: from now",
    )
    tail.add_argument("--count", type=int, help="stop after this many messages")
    tail.set_defaults(run=_tail)

    publish = commands.add_parser("publish", help="publish one message")
    connection(publish)
    header(publish)
    publish.add_argument("topic")
    publish.add_argument("data", help="JSON (anything else is sent as a string)")
    publish.add_argument("--raw", action="store_true", help="send DATA as a string")
    publish.set_defaults(run=_publish)

    up = commands.add_parser("upload", help="upload a file (WebSocket upload protocol)")
    up.add_argument("url", help="the WebSocket upload endpoint")
    up.add_argument("file")
    up.add_argument("--resume", metavar="ID", help="continue the upload ID")
    up.add_argument("--retries", type=int, default=5, help="failed attempts in a row (5)")
    up.add_argument("--quiet", action="store_true", help="no progress on stderr")
    header(up)
    up.set_defaults(run=_upload)

    metrics = commands.add_parser("metrics", help="print a server's Prometheus /metrics")
    metrics.add_argument("url", help="e.g. http://host:8888/metrics")
    metrics.add_argument("--timeout", type=float, default=30.0)
    header(metrics)
    metrics.set_defaults(run=_metrics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = asyncio.run(args.run(args))
    except KeyboardInterrupt:
        return 130
    except (ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        print(f"longconn: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
