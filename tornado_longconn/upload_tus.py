"""A tus 1.0.0 resumable-upload server handler for Tornado, on :class:`UploadStore`.

Extensions: ``creation``, ``creation-with-upload``, ``creation-defer-length``,
``termination``, ``checksum`` (``sha1``, ``sha256``, ``md5``), ``expiration`` and
``concatenation``. Existing tus clients (tus-js-client, also with ``parallelUploads``,
tuspy, Uppy) work unchanged. Hooks around an upload's life (``pre_create``,
``post_finish``, ...) are methods to override or a
:class:`~tornado_longconn.upload_hooks.TusHooks` object. Route it with
:meth:`TusUploadHandler.routes`::

    store = UploadStore("/var/uploads", max_size=2 << 30)
    app = tornado.web.Application(
        TusUploadHandler.routes("/files", store=store, cors_origins=["https://app.example"])
    )

Status codes beyond the tus specification's: 400 for malformed headers, 404 for
unknown ids (and any id the store did not generate), 410 for an expired upload, 412
for a missing or unsupported ``Tus-Resumable``, 413 past ``Tus-Max-Size`` or the
declared length, 415 for a PATCH without ``application/offset+octet-stream``, 423
(Locked) when another request is writing the same upload (exactly one PATCH proceeds;
the client retries after a HEAD; with a store on shared state a PATCH takes no lock:
of two at one offset the first to commit proceeds and the other gets 409), 460 for a checksum mismatch (chunk discarded, offset
unchanged), 507 when the storage is full (the offset stays at the bytes on disk), 405
for an ``X-HTTP-Method-Override`` other than ``PATCH``, ``DELETE`` or ``HEAD``.

Deferred length and concatenation: ``Upload-Defer-Length`` other than ``1``, or with
``Upload-Length``, is 400; a PATCH's ``Upload-Length`` that differs from the declared
length or is below the bytes received is 400 (above ``Tus-Max-Size`` 413). A malformed
``Upload-Concat`` is 400; a final upload naming an unknown partial upload is 404 (410
if expired), an upload that is not partial or not finished 400, parts adding up past
``Tus-Max-Size`` 413, with ``Upload-Length``, ``Upload-Defer-Length`` or a body 400 --
all checked before anything is created or read. A PATCH to a final upload is 403.
Every error answer is counted in the store's ``stats().refused`` by status.

**Early answers are delivered.** An answer sent while the body still arrives (any of
the errors above, from ``prepare()`` or mid-body) goes out with ``Connection:
close``; the connection then reads and discards the rest of the body under the
bounds of an :class:`~tornado_longconn.streaming.EarlyAnswer` (8 MiB / 5 s by
default) before it closes, so the client reads the status instead of a reset.

**Location.** The ``Location`` of a new upload never comes from the client's
``Host`` header: it is ``base_url`` + ``/<id>`` when ``base_url`` is configured, else
built from ``Forwarded`` / ``X-Forwarded-Proto`` + ``X-Forwarded-Host`` when
``trust_forwarded`` is on (only behind a proxy that sets them), else the relative
reference ``<request path>/<id>`` (tus clients resolve it against the URL they
posted to).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import inspect
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import tornado.routing
import tornado.web

from tornado_longconn._tornado.web import finished
from tornado_longconn.exceptions import UploadError
from tornado_longconn.streaming import EarlyAnswer, EarlyAnswerMixin
from tornado_longconn.upload import (
    CHECKSUM_ALGORITHMS,
    encode_tus_metadata,
    is_upload_id,
    parse_tus_metadata,
)
from tornado_longconn.upload_hooks import TusHooks, UploadInfo
from tornado_longconn.upload_quota import QuotaTicket, UploadQuotaLedger
from tornado_longconn.upload_state import UploadStateUnavailable
from tornado_longconn.upload_storage import UploadHandle, UploadStorage

__all__ = ["TUS_EXPOSE_HEADERS", "TUS_VERSION", "TusUploadHandler"]

#: The tus protocol version this handler speaks.
TUS_VERSION = "1.0.0"

_EXTENSIONS = (
    "creation,creation-with-upload,creation-defer-length,termination,checksum,expiration,"
    "concatenation"
)
_log = logging.getLogger("tornado_longconn.upload")
_OFFSET_TYPE = "application/offset+octet-stream"
_BODY_SLACK = 256 * 1024
_INT_RE = re.compile(r"[0-9]{1,19}")
#: Methods a POST may carry in ``X-HTTP-Method-Override`` (tus core protocol).
_OVERRIDABLE = ("PATCH", "DELETE", "HEAD", "POST")
#: A host (and port) as a proxy may forward it: no path, userinfo, spaces or quotes.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
#: Response headers a browser tus client must be able to read (CORS expose list).
TUS_EXPOSE_HEADERS = (
    "Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Expires, "
    "Upload-Defer-Length, Upload-Concat, Tus-Resumable, Tus-Version, Tus-Extension, "
    "Tus-Max-Size, Tus-Checksum-Algorithm"
)
_ALLOW_HEADERS = (
    "Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, Upload-Checksum, "
    "Upload-Defer-Length, Upload-Concat, Content-Type, X-HTTP-Method-Override, "
    "X-Requested-With, Authorization"
)

#: ``on_complete``: called with the upload's handle (a
#: :class:`~tornado_longconn.upload.ChunkedUploadSink` with an ``UploadStore``).
CompleteCallback = Callable[[Any], "Awaitable[None] | None"]


def _parse_int(value: str | None, name: str) -> int:
    if value is None or not _INT_RE.fullmatch(value.strip()):
        raise UploadError(f"{name} must be a non-negative integer", status=400)
    return int(value.strip())


def _parse_checksum(header: str) -> tuple[str, bytes]:
    parts = header.strip().split(" ")
    if len(parts) != 2:
        raise UploadError("Upload-Checksum must be '<algorithm> <base64>'", status=400)
    algorithm, encoded = parts[0].lower(), parts[1]
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise UploadError(f"unsupported checksum algorithm {algorithm!r}", status=400)
    try:
        return algorithm, base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UploadError("Upload-Checksum digest is not base64", status=400) from exc


def _parse_concat(value: str | None) -> str | list[str] | None:
    """``Upload-Concat``: None, ``"partial"``, or the ids of a final upload's parts."""
    if value is None:
        return None
    value = value.strip()
    if value == "partial":
        return "partial"
    if value.startswith("final;"):
        ids = []
        for token in value[len("final;") :].split():
            path = urllib.parse.urlsplit(token).path.rstrip("/")
            upload_id = path.rsplit("/", 1)[-1]
            if not is_upload_id(upload_id):
                raise UploadError(
                    f"Upload-Concat names no upload of this server: {token[:80]!r}", status=400
                )
            ids.append(upload_id)
        if not ids:
            raise UploadError("Upload-Concat: final needs at least one partial upload", status=400)
        return ids
    raise UploadError("Upload-Concat must be 'partial' or 'final;<url> <url> ...'", status=400)


def _forwarded_origin(headers: Any) -> tuple[str, str] | None:
    """(proto, host) from the first ``Forwarded`` element, else ``X-Forwarded-*``."""
    proto = host = None
    forwarded = headers.get("Forwarded")
    if forwarded:
        first = forwarded.split(",")[0]
        for pair in first.split(";"):
            key, _, value = pair.strip().partition("=")
            value = value.strip().strip('"')
            if key.lower() == "proto":
                proto = value
            elif key.lower() == "host":
                host = value
    else:
        proto = (headers.get("X-Forwarded-Proto") or "").split(",")[0].strip() or None
        host = (headers.get("X-Forwarded-Host") or "").split(",")[0].strip() or None
    if proto is None or host is None:
        return None
    proto = proto.lower()
    if proto not in ("http", "https") or not _HOST_RE.fullmatch(host):
        return None
    return proto, host


@tornado.web.stream_request_body
class TusUploadHandler(EarlyAnswerMixin, tornado.web.RequestHandler):
    """tus 1.0.0 server: POST creates, HEAD reports the offset, PATCH appends, DELETE ends.

    ``initialize`` keyword arguments (pass them in the route's dict, or use
    :meth:`routes`):

    * ``store`` -- the :class:`~tornado_longconn.upload.UploadStore` (required), or
      any :class:`~tornado_longconn.upload_storage.UploadStorage`.
    * ``cors_origins`` [None] -- origins allowed to call from a browser: a list of
      origins, ``"*"`` for any, ``None`` to send no CORS headers.
    * ``on_complete`` [None] -- called with the sink once an upload is complete and
      renamed into place (may be async; the last PATCH waits for it). Not called for a
      partial upload (``Upload-Concat: partial``); called for the final one.
    * ``base_url`` [None] -- the public URL of the upload collection (e.g.
      ``"https://uploads.example/files"``, or an absolute path); ``Location`` is
      ``base_url/<id>``. Set it behind a proxy that rewrites paths or hosts.
    * ``trust_forwarded`` [False] -- without ``base_url``, build ``Location`` from
      ``Forwarded`` (``proto=``, ``host=``) or ``X-Forwarded-Proto`` +
      ``X-Forwarded-Host``. Turn it on only behind a proxy that sets (and strips
      client-sent copies of) these headers. Off, or when they are absent or
      malformed, ``Location`` is relative (``<request path>/<id>``).
    * ``hooks`` [None] -- a :class:`~tornado_longconn.upload_hooks.TusHooks` whose
      methods run at each step of an upload (see :mod:`tornado_longconn.upload_hooks`);
      the handler's methods of the same names call it, override them instead if you
      prefer.
    * ``progress_interval`` [None] -- seconds: also call ``post_receive`` while a body
      arrives, at most this often and only when the durable offset moved (like tusd's
      progress hooks; the calls run as tasks, the body does not wait for them).
      None: ``post_receive`` only once a request's body is stored.
    * ``early_answer`` [None: the application's, see
      :func:`~tornado_longconn.streaming.default_early_answer`] -- the
      :class:`~tornado_longconn.streaming.EarlyAnswer` bounds (bytes, seconds) for
      draining a body after an early answer, and its counters.

    * ``quotas`` [None] -- an :class:`~tornado_longconn.upload_quota.UploadQuotaLedger`
      (one per application): per user, bytes in flight (429 with ``Retry-After`` past
      them) and total bytes (413 for a declared ``Upload-Length`` past them); the user
      is :meth:`upload_quota_key`. Refusals count in ``stats().quota_refusals``.

    A POST carrying ``X-HTTP-Method-Override: PATCH`` (``DELETE``, ``HEAD``) is
    handled as that method, as the tus protocol asks (for clients behind proxies
    that only pass GET and POST).

    The request body is streamed: ``data_received`` returns the sink's write
    awaitable, so Tornado reads no more of the body while the window of chunks
    waiting for the disk is full. Subclass and override :meth:`upload_complete` as an
    alternative to ``on_complete``.
    """

    SUPPORTED_METHODS = ("OPTIONS", "HEAD", "POST", "PATCH", "DELETE")

    @classmethod
    def routes(cls, prefix: str, **kwargs: Any) -> list[tornado.routing.URLSpec]:
        """URL rules for ``prefix`` (creation) and ``prefix/<id>`` (one upload).

        ``kwargs`` are the ``initialize`` arguments. Returns two
        :class:`tornado.routing.URLSpec` to put in the ``Application``'s rule list.
        """
        prefix = prefix.rstrip("/")
        return [
            tornado.routing.URLSpec(prefix + "/?", cls, kwargs),
            tornado.routing.URLSpec(prefix + "/([^/]+)", cls, kwargs),
        ]

    def initialize(
        self,
        store: UploadStorage,
        cors_origins: Sequence[str] | str | None = None,
        on_complete: CompleteCallback | None = None,
        base_url: str | None = None,
        trust_forwarded: bool = False,
        early_answer: EarlyAnswer | None = None,
        hooks: TusHooks | None = None,
        progress_interval: float | None = None,
        quotas: UploadQuotaLedger | None = None,
    ) -> None:
        """Keep the handler configuration (see the class docstring)."""
        self.store = store
        self.quotas = quotas
        self._quota_ticket: QuotaTicket | None = None
        self.hooks = hooks
        self.progress_interval = progress_interval
        self._reported = -1
        self._reported_at = float("-inf")
        self.cors_origins = cors_origins
        self.on_complete = on_complete
        self.base_url = base_url.rstrip("/") if base_url is not None else None
        self.trust_forwarded = trust_forwarded
        self.early_answer = early_answer
        self._set_cors_headers()
        self._sink: UploadHandle | None = None
        self._holding = False
        self._failed = False
        self._with_body = False
        self._storing = False
        self._offset_hint: int | None = None

    # -- helpers --------------------------------------------------------------------

    def set_default_headers(self) -> None:
        """``Tus-Resumable`` and ``Cache-Control: no-store`` on every response, plus CORS."""
        self.set_header("Tus-Resumable", TUS_VERSION)
        self.set_header("Cache-Control", "no-store")
        self._set_cors_headers()

    def _set_cors_headers(self) -> None:
        # Also called by clear() from RequestHandler.__init__, before initialize().
        origin = self.request.headers.get("Origin")
        allowed = getattr(self, "cors_origins", None)
        if origin and allowed is not None and (allowed == "*" or origin in allowed):
            self.set_header("Access-Control-Allow-Origin", "*" if allowed == "*" else origin)
            if allowed != "*":
                self.add_header("Vary", "Origin")
            self.set_header("Access-Control-Expose-Headers", TUS_EXPOSE_HEADERS)

    def _expires_header(self, sink: UploadHandle) -> None:
        if not sink.state.is_stored:
            when = sink.state.expires_at(self.store.expire_after)
            self.set_header("Upload-Expires", email.utils.formatdate(when, usegmt=True))

    def _fail(self, error: UploadError) -> None:
        """Answer ``error`` now (also from ``data_received``: the rest is not read)."""
        self._failed = True
        if finished(self):
            return
        reason = getattr(error, "reason", None)
        if isinstance(error, UploadStateUnavailable):
            reason = "state"
        self.store.count_refused(error.status)
        count_reason = getattr(self.store, "count_reason", None)
        if reason is not None and count_reason is not None:
            count_reason(reason)
        self.clear()
        self.set_status(error.status, _REASONS.get(error.status))
        if error.retry_after is not None:
            self.set_header("Retry-After", str(max(1, math.ceil(error.retry_after))))
        if error.status == 412:
            self.set_header("Tus-Version", TUS_VERSION)
        if error.status in (409, 460, 507, 423, 413, 429):
            offset = self._sink.offset if self._sink is not None else self._offset_hint
            if offset is not None:
                self.set_header("Upload-Offset", str(offset))
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(str(error) + "\n")

    def _release(self) -> None:
        if self._sink is not None and self._holding:
            self._holding = False
            self._sink.release_later()

    async def _release_now(self) -> None:
        """Record the upload's state and let it go before the answer is sent."""
        if self._sink is not None and self._holding:
            self._holding = False
            await self._sink.end_write()

    async def _lock(self, upload_id: str) -> UploadHandle:
        if not is_upload_id(upload_id):
            raise UploadError("no such upload", status=404)
        try:
            sink = await self.store.lock_for_write(upload_id)
        except UploadError as err:
            if err.status == 423:  # Upload-Offset of the answer
                with contextlib.suppress(UploadError):
                    self._offset_hint = (await self.store.describe(upload_id)).offset
            raise
        self._sink = sink
        self._holding = True
        return sink

    async def _append(self, upload_id: str, offset: int) -> UploadHandle | None:
        """An append handle (no lock before the body; see ``UploadStore.open_append``)."""
        opener = getattr(self.store, "open_append", None)
        if opener is None or not is_upload_id(upload_id):
            return None
        sink: UploadHandle | None = await opener(upload_id, offset)
        if sink is not None:
            self._sink = sink
            self._holding = True
        return sink

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Plain-text errors (tus clients show the body)."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")

    # -- request lifecycle ----------------------------------------------------------

    async def prepare(self) -> None:
        """Check the tus headers and open/lock the upload before any body byte is read."""
        method = self.request.method
        if method == "OPTIONS":
            return
        try:
            override = self.request.headers.get("X-HTTP-Method-Override")
            if override is not None and method == "POST":
                override = override.strip().upper()
                if override not in _OVERRIDABLE:
                    raise UploadError(
                        f"X-HTTP-Method-Override must be one of {', '.join(_OVERRIDABLE)}",
                        status=405,
                    )
                # Tornado dispatches on request.method after prepare().
                self.request.method = method = override
            if self.request.headers.get("Tus-Resumable") != TUS_VERSION:
                raise UploadError("unsupported or missing Tus-Resumable", status=412)
            if method == "POST":
                await self._prepare_create()
            elif method == "PATCH":
                await self._prepare_patch()
        except UploadError as err:
            await self._release_now()
            self._fail(err)

    async def _prepare_create(self) -> None:
        if self.path_args and self.path_args[0]:
            raise UploadError("POST goes to the collection URL", status=405)
        headers = self.request.headers
        concat = _parse_concat(headers.get("Upload-Concat"))
        metadata = parse_tus_metadata(headers.get("Upload-Metadata", ""))
        with_body = headers.get("Content-Type", "").split(";")[0].strip() == _OFFSET_TYPE
        length = self._body_length() if with_body else 0
        if isinstance(concat, list):
            await self._prepare_final(concat, metadata, length)
            return
        defer = headers.get("Upload-Defer-Length")
        size: int | None
        if defer is not None:
            if defer.strip() != "1":
                raise UploadError("Upload-Defer-Length must be 1", status=400)
            if "Upload-Length" in headers:
                raise UploadError(
                    "Upload-Length and Upload-Defer-Length are mutually exclusive", status=400
                )
            size = None
        else:
            size = _parse_int(headers.get("Upload-Length"), "Upload-Length")
            if size > self.store.max_size:
                raise UploadError(
                    f"Upload-Length exceeds Tus-Max-Size {self.store.max_size}", status=413
                )
        limit = self.store.max_size if size is None else size
        if length is not None and length > limit:
            raise UploadError("body is longer than Upload-Length", status=413)
        checksum = headers.get("Upload-Checksum")
        parsed = _parse_checksum(checksum) if checksum is not None and with_body else None
        info = UploadInfo(id="", size=size, offset=0, metadata=metadata, concat=concat)
        metadata = await self._pre_create(info)
        if with_body:  # bytes in flight checked before anything is created (429)
            self._quota_in_flight(limit if length is None else length)
        reservation = self._reserve_total(size)
        try:
            self._sink = await self.store.create(size, metadata=metadata, concat=concat)
        except BaseException:
            if reservation is not None and self.quotas is not None:
                self.quotas.remove(reservation)
            raise
        if reservation is not None and self.quotas is not None:
            self.quotas.rename(reservation, self._sink.id)
        await self._post_hook(self.post_create, self._sink.info())
        if with_body:
            self._with_body = True
            await self._begin_body(parsed, self._sink.state.remaining)

    def upload_quota_key(self) -> str | None:
        """The key ``quotas`` count under: ``str(self.current_user)``, None (no quota) if
        there is no user. Override to count by API key, tenant, IP address, ...
        """
        user = self.current_user
        return None if user is None else str(user)

    def _reserve_total(self, size: int | None) -> str | None:
        """Count a new upload's declared size in its user's total (413 past it)."""
        key = self.upload_quota_key() if self.quotas is not None else None
        if key is None or size is None or self.quotas is None:
            return None
        reservation = "new:" + secrets.token_hex(8)
        self.quotas.add_total(key, reservation, size)
        return reservation

    def _quota_in_flight(self, nbytes: int) -> None:
        key = self.upload_quota_key() if self.quotas is not None else None
        if key is not None and self.quotas is not None and self._quota_ticket is None:
            self._quota_ticket = self.quotas.begin(key, nbytes)

    def _quota_done(self) -> None:
        ticket, self._quota_ticket = self._quota_ticket, None
        if ticket is not None and self.quotas is not None:
            self.quotas.end(ticket)

    async def _prepare_final(
        self, part_ids: list[str], metadata: dict[str, str], length: int | None
    ) -> None:
        headers = self.request.headers
        if "Upload-Length" in headers or "Upload-Defer-Length" in headers:
            raise UploadError(
                "a final upload takes its length from its parts: no Upload-Length", status=400
            )
        if length != 0:
            raise UploadError("a final upload has no body", status=400)
        size = await self.store.check_partials(part_ids)
        info = UploadInfo(
            id="", size=size, offset=0, metadata=metadata, concat="final", parts=tuple(part_ids)
        )
        metadata = await self._pre_create(info)
        self._sink = await self.store.concatenate(part_ids, metadata=metadata)
        await self._post_hook(self.post_create, self._sink.info())

    async def _pre_create(self, info: UploadInfo) -> dict[str, str]:
        try:
            result = self.pre_create(info)
            if inspect.isawaitable(result):
                result = await result
        except UploadError:
            self.store.count_hook(rejected=True)
            raise
        if result is None:
            return dict(info.metadata)
        return {str(key): str(value) for key, value in result.items()}

    async def _post_hook(
        self, hook: Callable[[UploadInfo], Awaitable[None] | None], info: UploadInfo
    ) -> None:
        try:
            result = hook(info)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.store.count_hook(rejected=False)
            _log.exception("upload hook %s failed for %s", hook.__name__, info.id)

    async def _prepare_patch(self) -> None:
        headers = self.request.headers
        if headers.get("Content-Type", "").split(";")[0].strip() != _OFFSET_TYPE:
            raise UploadError(f"PATCH needs Content-Type: {_OFFSET_TYPE}", status=415)
        offset = _parse_int(headers.get("Upload-Offset"), "Upload-Offset")
        checksum = headers.get("Upload-Checksum")
        parsed = _parse_checksum(checksum) if checksum is not None else None
        length = self._body_length()
        declared = headers.get("Upload-Length")
        new_size = None if declared is None else _parse_int(declared, "Upload-Length")
        upload_id = self.path_args[0] if self.path_args else ""
        sink = None
        if new_size is None and length:  # bytes to append, no length to declare
            sink = await self._append(upload_id, offset)
        if sink is None:
            sink = await self._lock(upload_id)  # one writer: a concurrent PATCH gets 423
        if sink.concat == "final":
            raise UploadError("a final upload cannot be modified", status=403)
        sink.state.check_offset(offset)
        if new_size is not None:
            fits = new_size < offset or not sink.deferred  # else declare_length answers
            if not fits and length is not None and offset + length > new_size:
                raise UploadError("body is longer than Upload-Length", status=413)
            key = self.upload_quota_key() if self.quotas is not None else None
            counted = sink.deferred and key is not None and self.quotas is not None
            if counted and key is not None and self.quotas is not None:
                self.quotas.add_total(key, sink.id, new_size)  # 413 past the total
            try:
                await sink.declare_length(new_size)
            except BaseException:
                if counted and self.quotas is not None:
                    self.quotas.remove(sink.id)
                raise
        if length is not None:
            sink.state.check_length(length)
        self._with_body = True
        await self._begin_body(parsed, sink.state.remaining)

    def _body_length(self) -> int | None:
        value = self.request.headers.get("Content-Length")
        return None if value is None else _parse_int(value, "Content-Length")

    async def _begin_body(self, checksum: tuple[str, bytes] | None, limit: int) -> None:
        assert self._sink is not None
        if not self._holding:
            await self._lock(self._sink.id)
        # Tornado's default body limit is 100 MB; the upload's own limit applies instead.
        # The slack lets a chunked body that overshoots reach data_received, which
        # answers 413 (Tornado itself would answer a bare 400).
        self.request.connection.set_max_body_size(limit + _BODY_SLACK)  # type: ignore[union-attr]
        length = self._body_length()
        self._quota_in_flight(limit if length is None else length)
        if checksum is not None:
            await self._sink.begin_segment(*checksum)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """Hand the chunk to the sink; the returned awaitable is Tornado's flow control."""
        if self._failed or self._sink is None or not self._holding:
            return None
        try:
            room = self._sink.write(chunk)
        except UploadError as err:
            self._abandon_body(err)
            return None
        if self.progress_interval is not None:
            self._progress()
        return room

    def _progress(self) -> None:
        """``post_receive`` while a body arrives: the offset moved and the interval passed."""
        sink = self._sink
        assert sink is not None and self.progress_interval is not None
        now = time.monotonic()
        if sink.offset > self._reported and now - self._reported_at >= self.progress_interval:
            self._reported, self._reported_at = sink.offset, now
            self.store.spawn(self._post_hook(self.post_receive, sink.info()))

    def _abandon_body(self, err: UploadError) -> None:
        self._fail(err)
        sink = self._sink
        if sink is not None:
            self.store.spawn(self._settle(sink))

    async def _settle(self, sink: UploadHandle) -> None:
        """After an interrupted body: keep what was stored (or roll back a segment)."""
        try:
            if sink.in_segment:
                await sink.rollback_segment()
            else:
                await sink.flush()
        except UploadError:
            pass
        finally:
            await self._release_now()

    def on_connection_close(self) -> None:
        """The client went away mid-body: the partial file keeps every stored byte."""
        super().on_connection_close()
        self._quota_done()
        # Once the whole body arrived, _store_body owns the upload: it verifies and
        # records what was stored even if the client is gone.
        if self._holding and self._sink is not None and not self._failed and not self._storing:
            self._failed = True
            self.store.spawn(self._settle(self._sink))

    def on_finish(self) -> None:
        """Release the upload if the response ended without the body being stored."""
        self._quota_done()
        if self._holding and self._sink is not None and not self._failed:
            self._release()

    async def _store_body(self) -> UploadHandle | None:
        """Flush and verify the body; answer errors; None if the response was sent."""
        sink = self._sink
        if finished(self) or self._failed or sink is None:
            return None
        self._storing = True
        try:
            if sink.concat == "final":
                await self._completed(sink)
                return sink
            await sink.end_segment()
            commit = getattr(sink, "end_append", None)
            if commit is not None:  # an append handle: one compare-and-set commits it
                await commit()
            if self._with_body and sink.offset != self._reported:
                self._reported = sink.offset
                await self._post_hook(self.post_receive, sink.info())
            if sink.state.is_stored:
                await self._finish(sink)
        except UploadError as err:
            await self._release_now()
            self._fail(err)
            return None
        finally:
            await self._release_now()
        return sink

    async def _finish(self, sink: UploadHandle) -> None:
        try:
            result = self.pre_finish(sink.info())
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            await sink.abort()
            if isinstance(exc, UploadError):
                self.store.count_hook(rejected=True)
                raise
            self.store.count_hook(rejected=False)
            _log.exception("pre_finish hook failed; upload %s removed", sink.id)
            raise UploadError("pre_finish hook failed", status=500) from exc
        await sink.finish()
        await self._completed(sink)

    async def _completed(self, sink: UploadHandle) -> None:
        if sink.concat != "partial":
            result = self.upload_complete(sink)
            if inspect.isawaitable(result):
                await result
        await self._post_hook(self.post_finish, sink.info())

    # -- methods --------------------------------------------------------------------

    def options(self, upload_id: str | None = None) -> None:
        """Capabilities (and the CORS preflight answer)."""
        self.set_header("Tus-Version", TUS_VERSION)
        self.set_header("Tus-Extension", _EXTENSIONS)
        self.set_header("Tus-Max-Size", str(self.store.max_size))
        self.set_header("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS))
        if self.request.headers.get("Origin") and self._headers.get("Access-Control-Allow-Origin"):
            self.set_header("Access-Control-Allow-Methods", "POST, HEAD, PATCH, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", _ALLOW_HEADERS)
            self.set_header("Access-Control-Max-Age", "86400")
        self.set_status(204)

    async def post(self, upload_id: str | None = None) -> None:
        """Creation (and creation-with-upload): 201 with ``Location``."""
        sink = await self._store_body()
        if sink is None:
            return
        self.set_header("Location", self.upload_url(sink.id))
        self.set_header("Upload-Offset", str(sink.offset))
        self._expires_header(sink)
        self.set_status(201)

    def upload_url(self, upload_id: str) -> str:
        """The ``Location`` of upload ``upload_id`` (see ``base_url``/``trust_forwarded``).

        Never built from the client's ``Host`` header. Override to use another scheme.
        """
        if self.base_url is not None:
            return f"{self.base_url}/{upload_id}"
        collection = self.request.path.rstrip("/")
        if self.path_args and self.path_args[0]:  # a request to /files/<id>
            collection = collection.rsplit("/", 1)[0]
        path = urllib.parse.quote(collection, safe="/")
        if self.trust_forwarded:
            origin = _forwarded_origin(self.request.headers)
            if origin is not None:
                return f"{origin[0]}://{origin[1]}{path}/{upload_id}"
        return f"{path}/{upload_id}"

    async def patch(self, upload_id: str) -> None:
        """Append the body at ``Upload-Offset``; 204 with the new ``Upload-Offset``."""
        sink = await self._store_body()
        if sink is None:
            return
        self.set_header("Upload-Offset", str(sink.offset))
        self._expires_header(sink)
        self.set_status(204)

    async def head(self, upload_id: str) -> None:
        """The durable offset, length and metadata of an upload."""
        try:
            if not is_upload_id(upload_id):
                raise UploadError("no such upload", status=404)
            info = await self.store.describe(upload_id)
        except UploadError as err:
            self._fail(err)
            return
        self.set_header("Upload-Offset", str(info.offset))
        if info.size is None:
            self.set_header("Upload-Defer-Length", "1")
        else:
            self.set_header("Upload-Length", str(info.size))
        if info.concat == "partial":
            self.set_header("Upload-Concat", "partial")
        elif info.concat == "final":
            urls = " ".join(self.upload_url(part) for part in info.parts)
            self.set_header("Upload-Concat", f"final;{urls}")
        if info.metadata:
            self.set_header("Upload-Metadata", encode_tus_metadata(info.metadata))
        if info.expires is not None:
            self.set_header("Upload-Expires", email.utils.formatdate(info.expires, usegmt=True))
        self.set_status(200)

    async def delete(self, upload_id: str) -> None:
        """Termination: 204, the upload's files are removed; its id answers 404 afterwards.

        A completed upload is removed too (its final file, if still at
        ``store.final_path(id)``, and its record), as the tus termination extension
        requires. 423 while another request writes it.
        """
        try:
            sink = await self._lock(upload_id)
            info = sink.info()
            await sink.delete()
            if self.quotas is not None:
                self.quotas.remove(upload_id)
        except UploadError as err:
            await self._release_now()
            self._fail(err)
            return
        await self._release_now()
        await self._post_hook(self.post_terminate, info)
        self.set_status(204)

    def upload_complete(self, sink: Any) -> Awaitable[None] | None:
        """Called once an upload is complete; default: call ``on_complete`` if given.

        Override in a subclass to move the file (``sink.path``), record it, etc. May
        be async; the client's last request waits for it.
        """
        if self.on_complete is not None:
            return self.on_complete(sink)
        return None

    # -- hooks (see tornado_longconn.upload_hooks) --------------------------------------

    def pre_create(
        self, info: UploadInfo
    ) -> Mapping[str, str] | Awaitable[Mapping[str, str] | None] | None:
        """Before creation: return None (accept), new metadata, or raise ``UploadError``.

        Default: the ``hooks`` object's, if any. ``info.id`` is ``""``; for a final
        concatenation ``info.concat == "final"`` and ``info.size`` is the parts' total.
        """
        return self.hooks.pre_create(info, self.request) if self.hooks is not None else None

    def post_create(self, info: UploadInfo) -> Awaitable[None] | None:
        """The upload exists (before a creation-with-upload body is stored)."""
        return self.hooks.post_create(info, self.request) if self.hooks is not None else None

    def post_receive(self, info: UploadInfo) -> Awaitable[None] | None:
        """A request's body is stored; ``info.offset`` is the new durable offset."""
        return self.hooks.post_receive(info, self.request) if self.hooks is not None else None

    def pre_finish(self, info: UploadInfo) -> Awaitable[None] | None:
        """Every byte is stored, the file not yet finished; raise ``UploadError`` to reject.

        A rejected upload is removed and the client gets the error's status. Not
        called for a final concatenation (its parts were each finished).
        """
        return self.hooks.pre_finish(info, self.request) if self.hooks is not None else None

    def post_finish(self, info: UploadInfo) -> Awaitable[None] | None:
        """The file is complete (also for partial uploads: see ``info.concat``)."""
        return self.hooks.post_finish(info, self.request) if self.hooks is not None else None

    def post_terminate(self, info: UploadInfo) -> Awaitable[None] | None:
        """A DELETE removed the upload (``info`` as it was before)."""
        return self.hooks.post_terminate(info, self.request) if self.hooks is not None else None


_REASONS = {
    460: "Checksum Mismatch",
    423: "Locked",
    507: "Insufficient Storage",
    429: "Too Many Requests",
}
