"""Server variants that stream ``count`` binary messages of ``size`` bytes to each client.

Usage: ``python -m benchmarks.servers.stream_server VARIANT``; a client connects to
``/stream?count=N&size=S`` and receives ``make_payload(0..N-1, S)`` as binary frames.

Variants:

* ``tornado-await``: stock Tornado, ``await self.write_message(m, binary=True)`` per message;
* ``tornado-fire``: stock Tornado, ``self.write_message(m, binary=True)`` without awaiting
  (the tutorial style: every message is buffered at once);
* ``websockets``: the ``websockets`` library (``websockets.asyncio.server.serve``,
  ``await ws.send(m)``, compression off like the other variants);
* ``ours``: Tornado + ``await BackpressureWriter.of(self).send(m)``.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

from benchmarks.harness import PayloadMaker, query_int, serve_tornado, serve_until_sigterm

__all__ = ["VARIANTS", "main"]

VARIANTS = ("tornado-await", "tornado-fire", "websockets", "ours")


def _tornado_app(variant: str) -> Any:
    import tornado.web
    import tornado.websocket

    class Await(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            make = PayloadMaker(query_int(self, "size"))
            try:
                for seq in range(query_int(self, "count")):
                    await self.write_message(make(seq), binary=True)
            except tornado.websocket.WebSocketClosedError:
                pass

    class Fire(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            make = PayloadMaker(query_int(self, "size"))
            for seq in range(query_int(self, "count")):
                self.write_message(make(seq), binary=True)

    # Imported before serving, so that the import does not count as RSS growth.
    from tornado_longconn.backpressure import BackpressureWriter
    from tornado_longconn.exceptions import LongConnError

    class Ours(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            make = PayloadMaker(query_int(self, "size"))
            writer = BackpressureWriter.of(self)
            try:
                for seq in range(query_int(self, "count")):
                    await writer.send(make(seq))
            except LongConnError:
                pass

    handler = {"tornado-await": Await, "tornado-fire": Fire, "ours": Ours}[variant]
    return tornado.web.Application([("/stream", handler)])


def _serve_websockets() -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        make = PayloadMaker(int(query["size"][0]))
        try:
            for seq in range(int(query["count"][0])):
                await ws.send(make(seq))
        except ConnectionClosed:
            pass

    async def start() -> int:
        server = await serve(
            handler, "127.0.0.1", 0, compression=None, max_size=None, ping_interval=None
        )
        return int(next(iter(server.sockets)).getsockname()[1])

    serve_until_sigterm(start)


def main(argv: list[str]) -> None:
    """Serve the variant named in ``argv[1]``."""
    variant = argv[1] if len(argv) > 1 else ""
    if variant not in VARIANTS:
        raise SystemExit(f"usage: stream_server.py {{{','.join(VARIANTS)}}}")
    if variant == "websockets":
        _serve_websockets()
    else:
        serve_tornado(_tornado_app(variant))


if __name__ == "__main__":
    main(sys.argv)
