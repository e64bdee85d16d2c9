"""tornado_longconn.server: production limits and an accept loop that survives EMFILE.

The exhaustion test runs the server in a child process whose descriptor limit is
64 (``resource.setrlimit`` in the child), floods it from 127.0.0.1 with more
partial requests than it has descriptors, and checks that the log stays small,
that the header timeout closes every partial request, and that a legitimate
request is then answered.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable

import httpx
import pytest
import tornado
import tornado.httpserver
import tornado.tcpserver
import tornado.web

from tornado_longconn._tornado import server as door
from tornado_longconn.exceptions import LongConnError
from tornado_longconn.server import (
    AcceptThrottle,
    LongConnHTTPServer,
    ServerLimits,
    start_server,
)
from tornado_longconn.testing import scaled

# ------------------------------------------------------------------ pure throttle


def test_backoff_doubles_to_the_cap_and_resets_after_a_success() -> None:
    t = AcceptThrottle(backoff=0.05, backoff_max=0.4, log_interval=10.0)
    delays = [t.failed(1.0 + i * 0.01, errno.EMFILE)[0] for i in range(6)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    t.accepted(2.0)
    assert t.failed(2.1, errno.EMFILE)[0] == 0.05
    assert (t.errors, t.pauses) == (7, 7)


def test_one_log_line_per_interval_with_the_count_it_did_not_log() -> None:
    t = AcceptThrottle(backoff=0.05, backoff_max=1.0, log_interval=10.0)
    lines = [t.failed(100.0 + i * 0.5, errno.ENFILE)[1] for i in range(40)]  # 20 s of errors
    logged = [line for line in lines if line is not None]
    assert len(logged) == 2  # at 100.0 and at 110.0
    assert "ENFILE" in logged[0] and "not logged" not in logged[0]
    assert "19 similar errors in the last 10 s not logged" in logged[1]
    assert t.suppressed == 38
    # Errors still unreported are reported once accepting works again, an interval later.
    assert t.accepted(115.0) is None
    line = t.accepted(120.0)
    assert line is not None and "19 similar errors" in line
    assert t.accepted(131.0) is None


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_every_exhaustion_errno_is_named_in_the_log(err: int) -> None:
    line = AcceptThrottle().failed(0.0, err)[1]
    assert line is not None and errno.errorcode[err] in line


@pytest.mark.parametrize(
    "kwargs",
    [
        {"idle_connection_timeout": 0},
        {"body_timeout": -1.0},
        {"max_header_size": 0},
        {"max_body_size": 0},
        {"accept_backoff": 2.0, "accept_backoff_max": 1.0},
        {"accept_backoff": 0.0},
        {"log_interval": -1.0},
    ],
)
def test_limits_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        ServerLimits(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the Tornado door


def test_door_reads_the_installed_tornado() -> None:
    server = tornado.httpserver.HTTPServer(tornado.web.Application())
    internals = door.check_tcpserver(server)
    assert internals._sockets == {} and internals._handlers == {}
    assert callable(internals._handle_connection)


def test_door_check_runs_at_import_and_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    door.check_server()  # the installed Tornado has every name
    monkeypatch.delattr(tornado.tcpserver.TCPServer, "_handle_connection")
    with pytest.raises(LongConnError, match=r"_handle_connection.*" + re.escape(tornado.version)):
        door.check_server()


def test_door_fails_loudly_naming_the_attribute_and_version() -> None:
    server = tornado.httpserver.HTTPServer(tornado.web.Application())
    del server._handlers  # what a Tornado release that renamed it would look like
    with pytest.raises(LongConnError, match=r"_handlers.*" + tornado.version.replace(".", r"\.")):
        door.check_tcpserver(server)


# ------------------------------------------------------------------ in process


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("hello")

    def post(self) -> None:
        self.write(str(len(self.request.body)))


@pytest.fixture
async def server() -> AsyncIterator[tuple[LongConnHTTPServer, int]]:
    limits = ServerLimits(idle_connection_timeout=scaled(1.0), max_header_size=2048)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = start_server(
        tornado.web.Application([(r"/", Hello)]),
        port,
        "127.0.0.1",
        limits=limits,
        max_body_size=100,
    )
    try:
        yield srv, port
    finally:
        srv.stop()
        await srv.close_all_connections()


async def refused(request: Awaitable[httpx.Response]) -> bool:
    """True if the server answered 4xx or closed the connection instead of answering."""
    try:
        response = await request
    except httpx.HTTPError:
        return True
    return 400 <= response.status_code < 500


async def test_limits_apply_and_an_explicit_argument_wins(
    server: tuple[LongConnHTTPServer, int],
) -> None:
    srv, port = server
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/")).text == "hello"
        assert (await client.post("/", content=b"x" * 100)).text == "100"
        # max_body_size=100 given explicitly beats the limits' 1 MiB.
        assert await refused(client.post("/", content=b"x" * 101))
        # Headers beyond max_header_size (2048 here) are refused too.
        assert await refused(client.get("/", headers={"X-Big": "y" * 4096}))
        assert (await client.get("/", headers={"X-Small": "y" * 1024})).text == "hello"
    assert srv.stats().accepted >= 2
    assert srv.stats().errors == 0


async def test_a_partial_request_is_closed_by_the_header_timeout(
    server: tuple[LongConnHTTPServer, int],
) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
    # Closed by the server (EOF), with no answer, well before Tornado's 3600 s.
    assert await asyncio.wait_for(reader.read(), scaled(10)) == b""
    writer.close()


# ------------------------------------------------------------------ descriptor exhaustion

CHILD = textwrap.dedent(
    """
    import asyncio, logging, resource, sys
    import tornado.netutil, tornado.web
    from tornado_longconn.server import LongConnHTTPServer, ServerLimits

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")

    class Hello(tornado.web.RequestHandler):
        def get(self):
            self.write("hello")

    async def main():
        limits = ServerLimits(
            idle_connection_timeout=float(sys.argv[1]), accept_backoff=0.02,
            accept_backoff_max=0.2, log_interval=3600.0,
        )
        [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", backlog=256)
        server = LongConnHTTPServer(tornado.web.Application([(r"/", Hello)]), limits=limits)
        server.add_sockets([sock])
        print("port", sock.getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)

FLOOD = 150  # partial requests; the child can hold about 55 at a time


@pytest.mark.slow
async def test_flood_beyond_the_descriptor_limit_logs_little_and_recovers() -> None:
    header_timeout = scaled(1.0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(header_timeout),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    writers: list[asyncio.StreamWriter] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
        assert line.startswith(b"port "), line
        port = int(line.split()[1])

        # More partial requests than the child has descriptors; each connect completes
        # in the kernel's accept queue whether or not the child can take it yet.
        readers = []
        for _ in range(FLOOD):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), scaled(10)
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
            readers.append(reader)
            writers.append(writer)
        # Every one of them is closed by the server's header timeout (EOF, no answer):
        # the first ~55 at once, the rest as descriptors free up and accept resumes.
        answers = await asyncio.wait_for(
            asyncio.gather(*(r.read() for r in readers)), scaled(10) + 4 * header_timeout
        )
        assert answers == [b""] * FLOOD
        for writer in writers:
            writer.close()
        writers.clear()

        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/", timeout=scaled(10))
        assert response.status_code == 200 and response.text == "hello"
    finally:
        for writer in writers:
            writer.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode(errors="replace")
    lines = log.splitlines()
    # The child did run out of descriptors, and said so once: no traceback per accept.
    assert any("EMFILE" in line for line in lines), log
    assert len(lines) <= 5, log
    assert "Traceback" not in log, log
