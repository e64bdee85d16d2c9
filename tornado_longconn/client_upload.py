"""A resumable upload over the WebSocket upload protocol, for Python programs.

:func:`upload` sends a file (a path, or ``bytes``) to a
:class:`~tornado_longconn.upload_ws.WebSocketUploadHandler` with the protocol of
``docs/reference/ws-upload-protocol.md``: ``start`` (or ``resume``), binary
chunks within the server's credit window, one ``ack`` per stored chunk, and
``complete`` once the sha256 matched. When the connection is lost, or the server
closes it with a code that a later attempt can get past (4409 conflict, 4507
storage full, 1011 internal error, 1001 going away), it reconnects with
full-jitter backoff, sends ``resume`` and goes on from the server's durable
offset: bytes already stored are never sent twice. ::

    result = await upload("ws://host/ws-upload", "video.mp4",
                          on_progress=lambda done, total: print(done, total))
    print(result.id, result.sha256)

For tus (HTTP) uploads use an existing tus client such as ``tuspy``: see the
Python client how-to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import tornado.httpclient
import tornado.iostream
import tornado.websocket

from .client import ClientError, backoff_delay
from .upload_ws import encode_chunk

__all__ = ["UploadResult", "upload"]

# Close codes of the protocol that no retry can get past, and their error codes.
_FATAL: Final = {
    4400: "bad_request",
    4404: "not_found",
    4413: "too_large",
    4460: "checksum_mismatch",
}


@dataclass(frozen=True, slots=True)
class UploadResult:
    """A finished upload: the server's ``id``, ``size`` and ``sha256`` (hex)."""

    id: str
    size: int
    sha256: str


def _digest_file(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


class _Lost(Exception):
    """The connection ended before ``complete`` (retry with ``resume``)."""


async def upload(
    url: str,
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    upload_id: str | None = None,
    metadata: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
    retries: int = 5,
    backoff_base: float = 0.5,
    backoff_cap: float = 10.0,
    connect_timeout: float = 10.0,
    idle_timeout: float = 60.0,
) -> UploadResult:
    """Upload ``source`` (a file path, or ``bytes``) to the WebSocket upload endpoint ``url``.

    ``name`` (default: the file's base name) and ``metadata`` go with ``start``;
    ``upload_id`` resumes an upload made earlier (perhaps by another process).
    ``on_ready(id)`` is called with the upload's id as soon as the server
    answers (save it to resume after a crash); ``on_progress(stored, total)``
    after every acknowledged chunk, with the bytes the server has stored.

    ``retries`` consecutive attempts that store nothing may fail before it gives
    up; a connection that makes progress resets the count. A stream silent
    for ``idle_timeout`` seconds counts as lost. The file is read and hashed off
    the event loop. Raises :class:`~tornado_longconn.client.ClientError`:
    ``bad_request``, ``not_found``, ``too_large``, ``checksum_mismatch`` (the
    server's 4400, 4404, 4413, 4460: not retried), or ``unavailable`` after
    ``retries`` failed attempts.
    """
    loop = asyncio.get_running_loop()
    path: str | None = None
    data: bytes | None = None
    if isinstance(source, bytes):
        data = source
        size, sha256 = len(data), hashlib.sha256(data).hexdigest()
    else:
        path = os.fspath(source)
        size, sha256 = await loop.run_in_executor(None, _digest_file, path)
        if name is None:
            name = os.path.basename(path)

    async def read(offset: int, count: int) -> bytes:
        if data is not None:
            return data[offset : offset + count]
        assert path is not None
        return await loop.run_in_executor(None, _read_at, path, offset, count)

    current = upload_id
    failures = 0
    attempt = 0
    stored = [-1]  # the most the server has acknowledged so far

    def progress(done: int, total: int) -> None:
        stored[0] = max(stored[0], done)
        if on_progress is not None:
            on_progress(done, total)

    while True:
        stored_before = stored[0]
        try:
            request = tornado.httpclient.HTTPRequest(
                url,
                headers=headers,
                connect_timeout=connect_timeout,
                request_timeout=connect_timeout,
            )
            conn = await tornado.websocket.websocket_connect(request, max_message_size=1 << 20)
        except tornado.httpclient.HTTPClientError as exc:
            if exc.code != 599:  # an answer that is not an upgrade: a wrong URL
                raise ClientError(
                    "unsupported", f"no WebSocket upload endpoint: HTTP {exc.code}", status=exc.code
                ) from exc
            conn = None
        except tornado.websocket.WebSocketError as exc:
            raise ClientError("unsupported", "no WebSocket upload endpoint") from exc
        except (OSError, tornado.iostream.StreamClosedError):
            conn = None
        if conn is not None:
            try:
                if current is None:
                    start: dict[str, Any] = {"type": "start", "size": size, "sha256": sha256}
                    if name is not None:
                        start["name"] = name
                    if metadata:
                        start["metadata"] = metadata
                else:
                    start = {"type": "resume", "id": current, "sha256": sha256}
                conn.write_message(json.dumps(start)).add_done_callback(_retrieve)
                ready = await _next(conn, idle_timeout)
                if ready.get("type") != "ready":
                    raise _Lost(f"unexpected answer {ready!r}")
                if current is None:
                    current = str(ready["id"])
                    if on_ready is not None:
                        on_ready(current)
                result = await _send(
                    conn, read, int(ready["offset"]), size, ready, idle_timeout, progress
                )
                if result is not None:
                    return result
            except _Lost as exc:
                code = conn.close_code
                if code in _FATAL:
                    raise ClientError(
                        _FATAL[code],
                        f"upload refused (close code {code}: {conn.close_reason})",
                    ) from exc
            finally:
                conn.close()
        failures = 1 if stored[0] > stored_before else failures + 1
        if failures > retries:
            raise ClientError("unavailable", f"upload failed {failures} times in a row")
        delay = backoff_delay(attempt, backoff_base, backoff_cap)
        attempt += 1
        await asyncio.sleep(delay)  # the backoff deadline, not a poll


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _next(conn: tornado.websocket.WebSocketClientConnection, timeout: float) -> Any:
    try:
        message = await asyncio.wait_for(conn.read_message(), timeout)
    except asyncio.TimeoutError:
        raise _Lost("no answer from the server") from None
    if message is None:
        raise _Lost(f"closed ({conn.close_code} {conn.close_reason})")
    if isinstance(message, bytes):
        raise _Lost("unexpected binary message")
    return json.loads(message)


async def _send(
    conn: tornado.websocket.WebSocketClientConnection,
    read: Callable[[int, int], Any],
    offset: int,
    size: int,
    ready: dict[str, Any],
    idle_timeout: float,
    on_progress: Callable[[int, int], None] | None,
) -> UploadResult | None:
    """Send from ``offset`` within the credit window; the result once ``complete``."""
    window = max(1, int(ready["window"]))
    chunk = max(1, int(ready["chunk_size"]))
    inflight: deque[int] = deque()
    upload_id = str(ready["id"])
    if on_progress is not None:
        on_progress(offset, size)
    while True:
        while len(inflight) < window and offset < size:
            data = await read(offset, chunk)
            if not data:
                raise ClientError("bad_request", "the file shrank while it was uploaded")
            try:
                await conn.write_message(encode_chunk(offset, data), binary=True)
            except tornado.websocket.WebSocketClosedError:
                raise _Lost("closed while sending") from None
            offset += len(data)
            inflight.append(offset)
        message = await _next(conn, idle_timeout)
        kind = message.get("type")
        if kind == "ack":
            expected = inflight.popleft() if inflight else None
            if message.get("offset") != expected:
                raise _Lost(f"ack at {message.get('offset')}, expected {expected}")
            if on_progress is not None:
                on_progress(int(message["offset"]), size)
        elif kind == "complete":
            return UploadResult(
                str(message.get("id", upload_id)),
                int(message.get("size", size)),
                str(message.get("sha256", "")),
            )
