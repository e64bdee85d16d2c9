"""Resumable uploads over a WebSocket: binary chunks with offsets, acks, a credit window.

The protocol is documented in ``docs/reference/ws-upload-protocol.md``. In short:

1. client: ``{"type": "start", "size": N, "name": "a.bin", "sha256": "<hex>"}``
   (or ``{"type": "resume", "id": "<id>"}``) as a text message;
2. server: ``{"type": "ready", "id": ..., "offset": O, "size": N, "window": K,
   "chunk_size": C}``;
3. client: binary messages, each an 8-byte big-endian offset followed by at most C
   bytes, never more than K of them unacknowledged;
4. server: one ``{"type": "ack", "offset": O}`` per chunk, sent once the chunk is
   stored (O is the durable offset), and ``{"type": "complete", ...}`` after the last.

Errors close the connection with a :class:`~tornado_longconn.codes.CloseCode`
``UPLOAD_*`` code; the client reconnects and sends ``resume`` to learn the durable
offset. :class:`WebSocketUploadMixin` implements the server side on a
:class:`~tornado_longconn.upload.UploadStore`; ``on_message`` returns the storage
awaitable, so Tornado reads no further message until the chunk is on disk.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import secrets
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import tornado.iostream
import tornado.websocket

from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import UploadError
from tornado_longconn.strict import StrictWebSocketMixin
from tornado_longconn.upload import ChunkedUploadSink, UploadStore, is_upload_id
from tornado_longconn.upload_quota import QuotaTicket, UploadQuotaLedger
from tornado_longconn.upload_state import UploadStateUnavailable

__all__ = [
    "OFFSET_HEADER",
    "WebSocketUploadHandler",
    "WebSocketUploadMixin",
    "close_code_for",
    "encode_chunk",
]

#: The header of every binary chunk: the chunk's offset, unsigned 64-bit big-endian.
OFFSET_HEADER = struct.Struct(">Q")

_CODES = {
    400: CloseCode.UPLOAD_BAD_REQUEST,
    404: CloseCode.UPLOAD_NOT_FOUND,
    410: CloseCode.UPLOAD_NOT_FOUND,
    409: CloseCode.UPLOAD_CONFLICT,
    423: CloseCode.UPLOAD_CONFLICT,
    413: CloseCode.UPLOAD_TOO_LARGE,
    429: CloseCode.RATE_LIMITED,
    460: CloseCode.UPLOAD_CHECKSUM_MISMATCH,
    507: CloseCode.UPLOAD_STORAGE_FULL,
}


def close_code_for(error: UploadError) -> CloseCode:
    """The WebSocket close code for an upload error (``INTERNAL_ERROR`` for 5xx others).

    400 → 4400, 404/410 → 4404, 409/423 → 4409, 413 → 4413, 429 → 4429 (an upload
    quota's bytes in flight), 460 → 4460, 507 → 4507; 503 (the shared upload state is
    unreachable) → 1011: reconnect and resume later.
    """
    return _CODES.get(error.status, CloseCode.INTERNAL_ERROR)


def encode_chunk(offset: int, data: bytes) -> bytes:
    """A binary chunk message: :data:`OFFSET_HEADER` of ``offset`` followed by ``data``."""
    return OFFSET_HEADER.pack(offset) + data


def _retrieve(future: Any) -> None:
    # A failed ack write (peer gone) is normal: mark the exception as retrieved.
    if not future.cancelled():
        future.exception()


def _reason(text: str) -> str:
    # A close reason must fit in a control frame (123 bytes of UTF-8).
    return text.encode("utf-8")[:120].decode("utf-8", errors="ignore")


class WebSocketUploadMixin:
    """Server side of the WebSocket upload protocol; mix into a ``WebSocketHandler``.

    Set :attr:`upload_store` (usually in ``initialize``). Class attributes:

    * :attr:`upload_window` [8] -- K: chunks a client may send before an ack.
    * :attr:`upload_chunk_size` [1 MiB] -- C: largest chunk payload; bigger closes
      with 4400. Keep ``websocket_max_message_size`` above ``C + 8``.
    * :attr:`upload_read_ahead` [False] -- False: ``on_message`` returns once the
      chunk is stored, so Tornado reads no further message before. True: up to the
      store's ``max_in_flight`` chunks wait for the disk while the next message is
      read (higher throughput per connection, same bounded memory); acks still
      mean "stored".
    * :attr:`upload_takeover_timeout` [10 s] -- a ``resume`` of an upload that
      another connection is still writing asks that connection to let go: it is
      closed with 4409, what it sent is stored, and the newcomer gets ``ready`` with
      the durable offset. A client that reconnected after a network change so
      resumes at once instead of waiting for the server to notice its old, half-open
      connection. Past this timeout the newcomer gets 4409 instead.

    ``on_message`` handles the protocol and returns the awaitable of the storage
    write. Override :meth:`upload_complete` to act on a finished file. One upload at a
    time per connection; after ``complete`` the client may ``start`` another.
    """

    upload_store: UploadStore
    upload_window: int = 8
    upload_chunk_size: int = 1 << 20
    upload_read_ahead: bool = False
    upload_takeover_timeout: float = 10.0
    #: Per-user upload quotas (:mod:`tornado_longconn.upload_quota`), or None. A
    #: ``start`` past the total closes with 4413; an upload counts its window
    #: (``upload_window * upload_chunk_size``) in flight while this connection holds
    #: it, a ``start``/``resume`` past the bytes in flight closes with 4429. The key
    #: is :meth:`upload_quota_key`.
    upload_quotas: UploadQuotaLedger | None = None
    _upload_quota_ticket: QuotaTicket | None = None
    _upload_sink: ChunkedUploadSink | None = None
    _upload_sha256: str | None = None
    _upload_acks: deque[int] | None = None

    async def on_message(self, message: str | bytes) -> None:
        """Handle one protocol message; Tornado awaits it before reading the next."""
        try:
            if isinstance(message, bytes):
                await self._upload_chunk(message)
            else:
                await self._upload_control(message)
        except UploadError as err:
            reason = getattr(err, "reason", None)
            if isinstance(err, UploadStateUnavailable):
                reason = "state"
            if reason is not None:
                self.upload_store.count_reason(reason)
            await self._upload_release()
            self._ws.close(close_code_for(err), _reason(str(err)))

    def upload_quota_key(self) -> str | None:
        """The key :attr:`upload_quotas` count under: ``str(current_user)``, or None."""
        user = self._ws.current_user
        return None if user is None else str(user)

    def _upload_quota_done(self) -> None:
        ticket, self._upload_quota_ticket = self._upload_quota_ticket, None
        if ticket is not None and self.upload_quotas is not None:
            self.upload_quotas.end(ticket)

    def on_close(self) -> None:
        """The connection ended: keep every stored byte and free the upload for a resume."""
        self._upload_quota_done()
        sink, self._upload_sink = self._upload_sink, None
        if sink is not None:
            sink.store.spawn(self._upload_settle(sink))

    def upload_complete(self, sink: ChunkedUploadSink) -> Awaitable[None] | None:
        """Called after an upload is complete (renamed into place, sha256 checked).

        ``sink.path`` is the final file, ``sink.filename`` the sanitized client name,
        ``sink.sha256`` the digest. May be async; the ``complete`` message is sent
        after it returns. Default: nothing.
        """
        return None

    # -- internals ------------------------------------------------------------------

    @property
    def _ws(self) -> tornado.websocket.WebSocketHandler:
        return cast(tornado.websocket.WebSocketHandler, self)

    @staticmethod
    async def _upload_settle(sink: ChunkedUploadSink) -> None:
        try:
            await sink.flush()
        finally:
            sink.stored_callback = None
            await sink.end_write()

    async def _upload_release(self) -> None:
        self._upload_quota_done()
        sink, self._upload_sink = self._upload_sink, None
        if sink is not None:
            try:
                await sink.flush()
            except UploadError:
                pass
            finally:
                sink.stored_callback = None
                await sink.end_write()

    async def _upload_send(self, payload: dict[str, Any]) -> None:
        try:
            await self._ws.write_message(json.dumps(payload, separators=(",", ":")))
        except (tornado.websocket.WebSocketClosedError, tornado.iostream.StreamClosedError):
            pass

    def _upload_ready(self, sink: ChunkedUploadSink) -> dict[str, Any]:
        return {
            "type": "ready",
            "id": sink.id,
            "offset": sink.offset,
            "size": sink.size,
            "window": self.upload_window,
            "chunk_size": self.upload_chunk_size,
        }

    async def _upload_control(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError as exc:
            raise UploadError("control message is not JSON", status=400) from exc
        if not isinstance(msg, dict):
            raise UploadError("control message must be a JSON object", status=400)
        kind = msg.get("type")
        store = self.upload_store
        if kind in ("start", "resume"):
            if self._upload_sink is not None:
                raise UploadError("an upload is already in progress here", status=409)
            sha256 = msg.get("sha256")
            if sha256 is not None and (
                not isinstance(sha256, str)
                or len(sha256) != 64
                or any(c not in "0123456789abcdefABCDEF" for c in sha256)
            ):
                raise UploadError("sha256 must be 64 hex digits", status=400)
            if kind == "start":
                size = msg.get("size")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise UploadError("size must be a non-negative integer", status=400)
                name = msg.get("name")
                meta = msg.get("metadata") or {}
                if not isinstance(meta, dict) or (name is not None and not isinstance(name, str)):
                    raise UploadError("name must be a string, metadata an object", status=400)
                metadata = {str(k): str(v) for k, v in meta.items()}
                if name is not None:
                    metadata["filename"] = name
                reservation = self._upload_quota_begin(size)
                try:
                    sink = await store.create(size, metadata=metadata)
                except BaseException:
                    self._upload_quota_done()
                    if reservation is not None and self.upload_quotas is not None:
                        self.upload_quotas.remove(reservation)
                    raise
                if reservation is not None and self.upload_quotas is not None:
                    self.upload_quotas.rename(reservation, sink.id)
                if store.shared is None:
                    sink.acquire(self._upload_let_go)
                else:  # the shared lock too: other processes see the upload being written
                    sink = await store.lock_for_write(sink.id, let_go=self._upload_let_go)
            else:
                upload_id = msg.get("id")
                if not isinstance(upload_id, str) or not is_upload_id(upload_id):
                    raise UploadError("no such upload", status=404)
                # A connection of this process still writing this upload is asked to
                # let go: the client reconnected, so that one is most likely half-open.
                # (With Redis shared state, one on another process is asked too.)
                self._upload_quota_begin(None)
                try:
                    sink = await store.lock_for_write(
                        upload_id,
                        let_go=self._upload_let_go,
                        take_over=self.upload_takeover_timeout,
                    )
                except BaseException:
                    self._upload_quota_done()
                    raise
            if not self._upload_connection_open():
                self._upload_quota_done()
                await sink.end_write()  # this connection closed while waiting: leave it free
                return
            self._upload_sink = sink
            self._upload_sha256 = sha256
            if self.upload_read_ahead:
                self._upload_acks = deque()
                sink.stored_callback = self._upload_stored
            await self._upload_send(self._upload_ready(sink))
            if sink.state.is_stored:
                await self._upload_finish(sink)
        elif kind == "abort":
            current = self._upload_sink
            if current is None:
                raise UploadError("no upload in progress", status=400)
            self._upload_sink = None
            self._upload_quota_done()
            current.stored_callback = None
            try:
                await current.abort()
            finally:
                await current.end_write()
            if self.upload_quotas is not None:
                self.upload_quotas.remove(current.id)
            await self._upload_send({"type": "aborted", "id": current.id})
        else:
            raise UploadError(f"unknown message type {str(kind)[:40]!r}", status=400)

    def _upload_quota_begin(self, size: int | None) -> str | None:
        """Count a new upload's ``size`` (None: a resume) and this connection's window."""
        ledger = self.upload_quotas
        key = self.upload_quota_key() if ledger is not None else None
        if ledger is None or key is None:
            return None
        reservation = None
        if size is not None:
            reservation = "new:" + secrets.token_hex(8)
            ledger.add_total(key, reservation, size)
        try:
            self._upload_quota_ticket = ledger.begin(
                key, self.upload_window * self.upload_chunk_size
            )
        except BaseException:
            if reservation is not None:
                ledger.remove(reservation)
            raise
        return reservation

    def _upload_let_go(self) -> Awaitable[None]:
        """Give this connection's upload up to a newer connection (see ``take_over``).

        Closes this connection with 4409 (a live client learns that another
        connection took over; a half-open one never hears it), stores what was
        accepted and releases the upload. Returns the awaitable of that.
        """
        sink, self._upload_sink = self._upload_sink, None
        if self._upload_connection_open():
            self._ws.close(CloseCode.UPLOAD_CONFLICT, "upload resumed on another connection")
        if sink is None:  # already let go (closed meanwhile): nothing to wait for
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return sink.store.spawn(self._upload_settle(sink))

    def _upload_connection_open(self) -> bool:
        """True while this handler's WebSocket connection is open."""
        ws = self._ws.ws_connection
        return ws is not None and not ws.is_closing()

    async def _upload_chunk(self, message: bytes) -> None:
        sink = self._upload_sink
        if sink is None:
            raise UploadError("binary chunk before start/resume", status=400)
        if len(message) <= OFFSET_HEADER.size:
            raise UploadError("chunk without payload", status=400)
        if len(message) - OFFSET_HEADER.size > self.upload_chunk_size:
            raise UploadError(f"chunk payload above {self.upload_chunk_size} bytes", status=400)
        (offset,) = OFFSET_HEADER.unpack_from(message)
        if offset != sink.state.accepted:
            raise UploadError(f"chunk offset {offset}, expected {sink.state.accepted}", status=409)
        sink.write(memoryview(message)[OFFSET_HEADER.size :])
        if self.upload_read_ahead and self._upload_acks is not None:
            self._upload_acks.append(sink.state.accepted)
            room = sink.commit()  # one write job per chunk: one ack per chunk
            if sink.state.remaining:
                await room
                return
            await sink.flush()  # the last chunk: acks were sent by _upload_stored
        else:
            stored = await sink.flush()
            if self._upload_sink is not sink:
                return  # taken over by another connection meanwhile
            await self._upload_send({"type": "ack", "offset": stored})
        if sink.state.is_stored and self._upload_sink is sink:
            await self._upload_finish(sink)

    def _upload_stored(self, offset: int, error: UploadError | None) -> None:
        """Read-ahead mode: ack every chunk stored by now, or close on a storage error."""
        acks = self._upload_acks
        if error is not None:
            self._ws.close(close_code_for(error), _reason(str(error)))
            return
        while acks and acks[0] <= offset:
            end = acks.popleft()
            try:
                sent = self._ws.write_message(json.dumps({"type": "ack", "offset": end}))
            except tornado.websocket.WebSocketClosedError:
                return
            sent.add_done_callback(_retrieve)

    async def _upload_finish(self, sink: ChunkedUploadSink) -> None:
        self._upload_sink = None
        self._upload_quota_done()
        sink.stored_callback = None
        try:
            await sink.finish(expected_sha256=self._upload_sha256)
        finally:
            await sink.end_write()
        result = self.upload_complete(sink)
        if inspect.isawaitable(result):
            await result
        await self._upload_send(
            {"type": "complete", "id": sink.id, "size": sink.size, "sha256": sink.sha256}
        )


class WebSocketUploadHandler(WebSocketUploadMixin, StrictWebSocketMixin):
    """A ready-made upload endpoint: ``(r"/upload", WebSocketUploadHandler, {"store": s})``.

    ``initialize`` keyword arguments: ``store`` (required), ``window`` [8],
    ``chunk_size`` [1 MiB], ``on_complete`` [None] (called with the sink, may be async),
    ``read_ahead`` [False] (see :attr:`WebSocketUploadMixin.upload_read_ahead`),
    ``quotas`` [None] (see :attr:`WebSocketUploadMixin.upload_quotas`).
    """

    def initialize(
        self,
        store: UploadStore,
        window: int = 8,
        chunk_size: int = 1 << 20,
        on_complete: Callable[[ChunkedUploadSink], Awaitable[None] | None] | None = None,
        read_ahead: bool = False,
        quotas: UploadQuotaLedger | None = None,
    ) -> None:
        """Keep the configuration (see the class docstring)."""
        self.upload_store = store
        self.upload_quotas = quotas
        self.upload_window = window
        self.upload_chunk_size = chunk_size
        self.upload_read_ahead = read_ahead
        self._on_complete = on_complete

    def upload_complete(self, sink: ChunkedUploadSink) -> Awaitable[None] | None:
        """Call ``on_complete`` if given."""
        if self._on_complete is not None:
            return self._on_complete(sink)
        return None

    def get_compression_options(self) -> None:
        """No permessage-deflate: chunks are usually already compressed media."""
        return None
