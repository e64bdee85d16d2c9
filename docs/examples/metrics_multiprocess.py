"""/metrics for an application of several processes sharing one port.

Run it with a fresh, empty directory for the metric files::

    rm -rf /tmp/longconn-metrics && mkdir /tmp/longconn-metrics
    PROMETHEUS_MULTIPROC_DIR=/tmp/longconn-metrics python docs/examples/metrics_multiprocess.py --processes 3

``fork_processes`` starts the processes; each serves every route, and a scrape of
``/metrics`` lands on any one of them. Each process writes its library families
to ``longconn_<pid>.json`` in the directory (``collector.share()``), and the
process that answers a scrape serves the sum of every file, plus
``prometheus_client``'s own multiprocess aggregate of the application's metrics
(``example_process_starts_total`` here). ``GET /pid`` says which process answered.

Each process, as it starts, publishes ``--messages`` messages to its own room: the
sum over processes shows in ``longconn_messages_published_total``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

import tornado.httpserver
import tornado.netutil
import tornado.process
import tornado.web
from prometheus_client import Counter

from tornado_longconn import BroadcastHub
from tornado_longconn.metrics import LongConnCollector, MetricsHandler


class Pid(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"pid": os.getpid()})


async def serve(sockets: list[socket.socket], messages: int) -> None:
    # Made after the fork: in multiprocess mode each process writes its own file.
    starts = Counter("example_process_starts", "Processes started.")
    starts.inc()
    hub = BroadcastHub()
    room = hub.group("room")
    for i in range(messages):
        await room.publish(f"message {i}")
    collector = LongConnCollector(hubs=[hub])
    app = tornado.web.Application(
        [(r"/metrics", MetricsHandler, {"collector": collector}), (r"/pid", Pid)]
    )
    collector.share(interval=1.0)  # $PROMETHEUS_MULTIPROC_DIR
    await collector.write_shared()  # this process is in every scrape from now on
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # One write(2) per line: the processes share the pipe.
    os.write(sys.stdout.fileno(), f"READY {os.getpid()} {sockets[0].getsockname()[1]}\n".encode())
    await stop.wait()
    server.stop()
    collector.unshare(remove=False)  # keep its totals for the processes still serving
    await hub.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8890)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--messages", type=int, default=5)
    args = parser.parse_args()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        parser.error("set PROMETHEUS_MULTIPROC_DIR to an empty directory")
    sockets = tornado.netutil.bind_sockets(args.port, "127.0.0.1", family=socket.AF_INET)
    tornado.process.fork_processes(args.processes)  # each child returns and serves
    asyncio.run(serve(sockets, args.messages))


if __name__ == "__main__":
    main()
