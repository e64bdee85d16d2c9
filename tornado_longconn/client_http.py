"""The HTTP pieces of the Python client: one cancellable request, and an SSE parser.

:func:`http_request` sends one HTTP/1.1 request over Tornado's public
``TCPClient`` and ``HTTP1Connection`` (the parts its own HTTP client is made of)
instead of ``AsyncHTTPClient.fetch``: cancelling the task that awaits it closes
the socket at once, which ``fetch`` cannot do, and its ``on_chunk`` callback may
return an awaitable that Tornado waits for before it reads more (flow control for
an endless Server-Sent Events stream). :class:`SSEParser` turns the bytes of a
stream into events without I/O. Both are used by :mod:`tornado_longconn.client`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import tornado.http1connection
import tornado.httputil
import tornado.tcpclient

__all__ = [
    "HTTPAnswer",
    "SSEEvent",
    "SSEParser",
    "http_request",
]

#: Largest answer body kept by :func:`http_request` without ``on_chunk`` (bytes).
MAX_BODY: Final = 16 * 1024 * 1024
# An SSE stream is one endless body: Tornado's body limit must not end it.
_ENDLESS: Final = 1 << 62


@dataclass(frozen=True, slots=True)
class HTTPAnswer:
    """What :func:`http_request` returns: ``status``, ``headers`` and ``body``.

    ``body`` is empty when the request was made with ``on_chunk`` (the chunks
    went there).
    """

    status: int
    headers: tornado.httputil.HTTPHeaders
    body: bytes


class _Delegate(tornado.httputil.HTTPMessageDelegate):
    def __init__(
        self,
        on_headers: Callable[[int], None] | None,
        on_chunk: Callable[[bytes], Awaitable[None] | None] | None,
    ) -> None:
        self.status = 0
        self.headers = tornado.httputil.HTTPHeaders()
        self.chunks: list[bytes] = []
        self.size = 0
        self._on_headers = on_headers
        self._on_chunk = on_chunk

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, tornado.httputil.ResponseStartLine)
        self.status = start_line.code
        self.headers = headers
        if self._on_headers is not None:
            self._on_headers(start_line.code)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        # Only a 200 streams to on_chunk; an error status keeps its (small) body.
        if self._on_chunk is not None and self.status == 200:
            return self._on_chunk(chunk)
        self.size += len(chunk)
        if self.size > MAX_BODY:
            raise ValueError(f"answer body over {MAX_BODY} bytes")
        self.chunks.append(chunk)
        return None


async def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    connect_timeout: float = 10.0,
    on_headers: Callable[[int], None] | None = None,
    on_chunk: Callable[[bytes], Awaitable[None] | None] | None = None,
    ssl_options: ssl.SSLContext | None = None,
) -> HTTPAnswer:
    """Send one HTTP/1.1 request to ``url`` (``http`` or ``https``) and read the answer.

    ``on_headers(status)`` is called when the status line and headers are in;
    ``on_chunk(bytes)`` then gets every piece of a 200 answer's body as it comes
    (return an awaitable to make Tornado read no more until it is done). The
    connection is closed when the answer ends, when an exception is raised, and
    when the awaiting task is cancelled (cancel it to stop a stream). No overall
    timeout: wrap it in :func:`asyncio.wait_for`. Raises ``OSError`` or
    Tornado's ``StreamClosedError`` when the connection fails, ``ValueError`` for
    a URL that is not ``http(s)``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    context: ssl.SSLContext | None = None
    if secure:
        context = ssl_options if ssl_options is not None else ssl.create_default_context()
    stream = await tornado.tcpclient.TCPClient().connect(
        parts.hostname,
        port,
        ssl_options=context,
        timeout=connect_timeout,
    )
    try:
        params = tornado.http1connection.HTTP1ConnectionParameters(
            no_keep_alive=True,
            max_body_size=_ENDLESS if on_chunk is not None else MAX_BODY,
            decompress=False,
        )
        conn = tornado.http1connection.HTTP1Connection(stream, True, params)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request_headers = tornado.httputil.HTTPHeaders(
            {"Host": parts.netloc, "Connection": "close", "Accept-Encoding": "identity"}
        )
        for key, value in (headers or {}).items():
            request_headers[key] = value
        if body is not None:
            request_headers["Content-Length"] = str(len(body))
        start = tornado.httputil.RequestStartLine(method, target, "HTTP/1.1")
        await conn.write_headers(start, request_headers)
        if body:
            await conn.write(body)
        conn.finish()
        delegate = _Delegate(on_headers, on_chunk)
        await conn.read_response(delegate)
        return HTTPAnswer(delegate.status, delegate.headers, b"".join(delegate.chunks))
    finally:
        stream.close()


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One Server-Sent Event: ``event`` (``"message"`` when unnamed), ``data``, ``id``.

    ``id`` is None when the event had no ``id:`` line. A comment (such as the
    library's ``: keep-alive``) is an event named ``""``.
    """

    event: str
    data: str
    id: str | None = None


class SSEParser:
    """Split a Server-Sent Events stream into :class:`SSEEvent` (no I/O).

    Feed it bytes as they come; it returns the events they complete. A line is
    at most ``max_line`` bytes (``ValueError`` beyond: a stream that never ends a
    line must not grow memory without bound).

    >>> parser = SSEParser()
    >>> parser.feed(b"id: a=e-1\\ndata: {\\"x\\":1}\\n\\n: keep-alive\\n\\nevent: re")
    [SSEEvent(event='message', data='{"x":1}', id='a=e-1'), SSEEvent(event='', data='keep-alive', id=None)]
    >>> parser.feed(b"sync\\ndata: 1\\n\\n")
    [SSEEvent(event='resync', data='1', id=None)]
    """

    def __init__(self, max_line: int = 1 << 20) -> None:
        self.max_line = max_line
        self._rest = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``."""
        buffer = self._rest + chunk
        lines = buffer.splitlines(keepends=True)
        self._rest = b""
        if lines and not lines[-1].endswith((b"\n", b"\r")):
            self._rest = lines.pop()
        elif lines and lines[-1].endswith(b"\r"):
            # "\r" may be the first half of "\r\n": wait for the next byte.
            self._rest = lines.pop()
        if len(self._rest) > self.max_line:
            raise ValueError(f"SSE line longer than {self.max_line} bytes")
        out: list[SSEEvent] = []
        for raw in lines:
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if not line:
                if self._data or self._event:
                    out.append(SSEEvent(self._event or "message", "\n".join(self._data), self._id))
                self._event, self._data, self._id = "", [], None
                continue
            if line.startswith(":"):
                out.append(SSEEvent("", line[1:].strip()))
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value
        return out
