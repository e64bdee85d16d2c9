"""Resumable, checksummed uploads to local storage that never block the event loop.

Three layers, from the inside out:

* :class:`UploadState` -- the I/O-free state machine of ONE upload: declared size,
  durable offset, bytes accepted but not yet stored, the size limit, the status
  (active, complete, aborted) and the last activity time (for expiration). It takes
  ``now`` and raises :class:`~tornado_longconn.exceptions.UploadError` carrying the
  HTTP status a tus server answers (409 offset mismatch, 413 too large, ...).
* :class:`ChunkedUploadSink` -- receives the chunks of one upload from the event loop
  and writes them to a partial file in an executor, at most ``max_in_flight`` chunks
  of ``chunk_size`` bytes queued (so memory stays at a few chunks), computing the
  whole-file sha256 and an optional per-request checksum (sha1/md5/sha256, as the tus
  checksum extension needs) in the same executor job. It finishes atomically: flush,
  ``fsync``, rename ``<id>.part`` to ``<id>``, ``fsync`` of the directory.
* :class:`UploadStore` -- the storage root: creates uploads under ids it generates
  itself (file paths never come from client names; the original name is kept only as
  sanitized metadata), reopens them after a restart, expires idle partial uploads
  (:meth:`UploadStore.sweep`) and locks an upload to one writer at a time.

**Durability and restarts.** The *durable offset* is the number of bytes in the partial file: a chunk counts once
its ``pwrite`` returned (it is then in the kernel, so it survives the death of the
server process; :meth:`ChunkedUploadSink.finish` adds the ``fsync`` that makes the
final file survive a power loss). Nothing else is trusted: after a restart the offset
is the size of ``<id>.part``. The running sha256 cannot be saved (``hashlib`` state
is not serialisable), so :meth:`UploadStore.open` re-hashes the partial file in the
executor the first time it opens an upload in a new process (reading at disk speed,
off the loop); later opens reuse the in-memory state.

A request that carries a per-request checksum is a *segment*: before the first byte
is written, a marker ``<id>.seg`` records the segment's start offset; on a mismatch
(or a disconnect, since the bytes cannot be verified) the partial file is truncated
back to that offset and the sha256 state restored. If the process dies inside a
segment, the next :meth:`UploadStore.open` finds the marker and truncates, so
unverified bytes never count.

Files in the storage root: ``<id>.info`` (JSON: size, sanitized metadata, creation
time), ``<id>.part`` while receiving, ``<id>.seg`` during a checksummed segment,
``<id>.<name>.seg`` for a body appended without the lock (with shared state, see
:meth:`UploadStore.open_append`), ``<id>`` once complete. ``<id>`` is 32 lowercase
hex digits from :mod:`secrets`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import resource
import secrets
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from tornado_longconn.exceptions import UploadError

from .logfields import log_fields
from .stats import COUNTER, GAUGE, TALLY

if TYPE_CHECKING:
    from .upload_state import SharedUploadRecord, SharedUploadState

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "MAX_CONCAT_PARTS",
    "ChunkedUploadSink",
    "UploadInfo",
    "UploadState",
    "UploadStats",
    "UploadStatus",
    "UploadStore",
    "default_max_open_files",
    "encode_tus_metadata",
    "is_upload_id",
    "parse_tus_metadata",
    "sanitize_filename",
    "upload_info",
]

#: Per-request checksum algorithms (tus ``Tus-Checksum-Algorithm`` names).
CHECKSUM_ALGORITHMS: tuple[str, ...] = ("sha1", "sha256", "md5")

#: The most partial uploads one concatenation may name (more: 400).
MAX_CONCAT_PARTS = 1000

_log = logging.getLogger("tornado_longconn.upload")
_ID_RE = re.compile(r"[0-9a-f]{32}")
_META_KEY_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_MAX_METADATA_BYTES = 4096
_MAX_NAME_BYTES = 255
#: The default open-file budget is this fraction of the soft ``RLIMIT_NOFILE``...
_OPEN_FILES_FRACTION = 4
#: ... never fewer than this ...
_OPEN_FILES_MIN = 16
#: ... and never more (an unlimited or huge soft limit).
_OPEN_FILES_MAX = 4096
#: Seconds a writer asked by another process to let go has to store what it accepted.
_LET_GO_TIMEOUT = 10.0


def default_max_open_files() -> int:
    """The default fd budget of an :class:`UploadStore`: a quarter of the soft fd limit.

    ``RLIMIT_NOFILE``'s soft limit // 4, at least 16 and at most 4096 (1024 -> 256,
    65536 -> 4096). The rest of the descriptors stay for sockets, logs and libraries.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return _OPEN_FILES_MAX
    return max(_OPEN_FILES_MIN, min(_OPEN_FILES_MAX, soft // _OPEN_FILES_FRACTION))


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> _Hasher: ...


def is_upload_id(value: str) -> bool:
    """True if ``value`` has the form of an id made by :class:`UploadStore` (32 hex digits).

    Handlers call it on ids taken from URLs before touching storage; anything else
    is answered with 404.
    """
    return _ID_RE.fullmatch(value) is not None


def sanitize_filename(name: str) -> str:
    """A harmless display name made from a client-supplied file name.

    Keeps only the last path component (``/`` and ``\\`` both separate), applies
    Unicode NFKC normalisation (so full-width slashes and dots become ASCII first),
    drops control characters (NUL included), leading dots and surrounding spaces,
    and cuts the result to 255 UTF-8 bytes. Returns ``"upload"`` when nothing is
    left. The result is metadata only: the library never builds a path from it.
    """
    name = unicodedata.normalize("NFKC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = name.strip().lstrip(".").strip()
    encoded = name.encode("utf-8")[:_MAX_NAME_BYTES]
    name = encoded.decode("utf-8", errors="ignore").strip()
    return name or "upload"


def parse_tus_metadata(header: str) -> dict[str, str]:
    """Parse a tus ``Upload-Metadata`` header into ``{key: text}``.

    The header is ``key base64value,key2 base64value2`` (a value may be absent).
    Values are decoded as UTF-8 (invalid bytes replaced). Raises
    :class:`~tornado_longconn.exceptions.UploadError` (status 400) on a malformed
    pair, a duplicate or invalid key, bad base64, or a header over 4 KiB.
    """
    if len(header.encode("utf-8", errors="replace")) > _MAX_METADATA_BYTES:
        raise UploadError("Upload-Metadata is longer than 4096 bytes", status=400)
    result: dict[str, str] = {}
    if not header.strip():
        return result
    for pair in header.split(","):
        parts = pair.strip().split(" ")
        if len(parts) > 2 or not _META_KEY_RE.fullmatch(parts[0]):
            raise UploadError(f"malformed Upload-Metadata pair {pair[:40]!r}", status=400)
        key = parts[0]
        if key in result:
            raise UploadError(f"duplicate Upload-Metadata key {key!r}", status=400)
        value = b""
        if len(parts) == 2:
            try:
                value = base64.b64decode(parts[1], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise UploadError(
                    f"Upload-Metadata value of {key!r} is not base64", status=400
                ) from exc
        result[key] = value.decode("utf-8", errors="replace")
    return result


def encode_tus_metadata(metadata: Mapping[str, str]) -> str:
    """The inverse of :func:`parse_tus_metadata`: ``key base64(utf-8 value)`` pairs."""
    return ",".join(
        f"{key} {base64.b64encode(value.encode('utf-8')).decode('ascii')}"
        for key, value in metadata.items()
    )


class UploadStatus(str, Enum):
    """Where an upload is in its life."""

    #: Receiving bytes; the partial file exists.
    ACTIVE = "active"
    #: Every declared byte is stored and the final file is in place.
    COMPLETE = "complete"
    #: Terminated (``abort()``, tus DELETE, expiry): the files are gone.
    ABORTED = "aborted"


class UploadState:
    """The I/O-free state machine of one upload (offsets, limits, status, activity time).

    ``size`` is the declared total length, ``max_size`` the server's limit,
    ``offset`` the durable offset to start from (bytes already stored), ``now`` the
    creation/activity time in seconds (any monotonic-enough clock; the store uses
    ``time.time()`` so it survives restarts). Raises
    :class:`~tornado_longconn.exceptions.UploadError` (400 for a negative size, 413
    when ``size > max_size``).

    Three counters: :attr:`offset` (durable: stored), :attr:`accepted` (durable plus
    bytes queued for storage) and :attr:`size`. The chunk checks use
    :attr:`accepted`, so a client cannot queue more than the declared size.
    """

    def __init__(
        self,
        *,
        size: int | None,
        max_size: int,
        offset: int = 0,
        now: float,
    ) -> None:
        #: True while the length is not known yet (tus ``creation-defer-length``): the
        #: upload accepts up to ``max_size`` bytes until :meth:`declare_length`.
        self.deferred = size is None
        if size is None:
            size = max_size
        if size < 0 or offset < 0:
            raise UploadError("size and offset must be >= 0", status=400)
        if size > max_size:
            raise UploadError(f"upload size {size} exceeds the maximum {max_size}", status=413)
        if offset > size:
            raise UploadError(f"offset {offset} is past the size {size}", status=409)
        self.size = size
        self.max_size = max_size
        self.offset = offset
        self.accepted = offset
        self.status = UploadStatus.ACTIVE
        self.last_activity = now

    @property
    def remaining(self) -> int:
        """Bytes still to be accepted before the declared size is reached."""
        return self.size - self.accepted

    @property
    def is_stored(self) -> bool:
        """True once every declared byte is durably stored (ready to finish).

        Never true while the length is deferred.
        """
        return not self.deferred and self.offset == self.size

    def declare_length(self, size: int) -> None:
        """Set the length of a deferred upload (tus ``creation-defer-length``).

        Raises ``UploadError`` 400 if the length was already declared with another
        value or is below the bytes already accepted, 413 above ``max_size``. Declaring
        the same length again is a no-op.
        """
        if not self.deferred:
            if size != self.size:
                raise UploadError(
                    f"Upload-Length {size} differs from the declared length {self.size}",
                    status=400,
                )
            return
        if size > self.max_size:
            raise UploadError(f"upload size {size} exceeds the maximum {self.max_size}", status=413)
        if size < self.accepted:
            raise UploadError(
                f"Upload-Length {size} is below the {self.accepted} bytes already received",
                status=400,
            )
        self.size = size
        self.deferred = False

    def check_offset(self, offset: int) -> None:
        """Check that a client resumes at the durable offset.

        Raises ``UploadError`` 409 if ``offset`` differs from :attr:`offset`, if
        bytes are still queued, or if the upload is no longer active (404 once aborted).
        """
        self._check_active()
        if offset != self.offset or self.accepted != self.offset:
            raise UploadError(
                f"Upload-Offset {offset} does not match the current offset {self.offset}",
                status=409,
            )

    def check_length(self, length: int) -> None:
        """Raise ``UploadError`` 413 if ``length`` more bytes would pass the declared size."""
        if length > self.remaining:
            raise UploadError(
                f"{length} bytes at offset {self.accepted} pass the declared size {self.size}",
                status=413,
            )

    def accept(self, length: int) -> None:
        """Count ``length`` bytes as queued; raises 413 past the size, 409 if not active."""
        self._check_active()
        self.check_length(length)
        self.accepted += length

    def stored(self, length: int, now: float) -> None:
        """``length`` queued bytes are now durably stored."""
        if self.offset + length > self.accepted:
            raise ValueError("stored more bytes than were accepted")
        self.offset += length
        self.last_activity = now

    def drop_queued(self) -> None:
        """Forget the bytes queued but not stored (after a storage error)."""
        self.accepted = self.offset

    def rewind(self, offset: int, now: float) -> None:
        """Move the durable offset back to ``offset`` (a rejected checksummed segment)."""
        if not 0 <= offset <= self.offset:
            raise ValueError(f"cannot rewind from {self.offset} to {offset}")
        self.offset = self.accepted = offset
        self.last_activity = now

    def complete(self) -> None:
        """Mark the upload complete; raises ``UploadError`` 409 if bytes are missing."""
        self._check_active()
        if not self.is_stored or self.accepted != self.offset:
            of = "an undeclared length" if self.deferred else str(self.size)
            raise UploadError(
                f"upload is incomplete: {self.offset} of {of} bytes stored", status=409
            )
        self.status = UploadStatus.COMPLETE

    def abort(self) -> None:
        """Mark the upload aborted (idempotent)."""
        self.status = UploadStatus.ABORTED

    def expires_at(self, expire_after: float) -> float:
        """When an idle partial upload expires: last activity + ``expire_after``."""
        return self.last_activity + expire_after

    def is_expired(self, now: float, expire_after: float) -> bool:
        """True if the upload is still active and idle for more than ``expire_after``."""
        return self.status is UploadStatus.ACTIVE and now >= self.expires_at(expire_after)

    def _check_active(self) -> None:
        if self.status is UploadStatus.ABORTED:
            raise UploadError("upload was terminated", status=404)
        if self.status is UploadStatus.COMPLETE:
            raise UploadError("upload is already complete", status=409)


@dataclass(frozen=True, slots=True)
class UploadInfo:
    """A snapshot of an upload: what hooks receive and :meth:`UploadStore.describe` returns.

    In ``pre_create`` the upload does not exist yet: ``id`` and ``path`` are ``""``.
    """

    #: The server-generated id (32 hex digits), ``""`` in ``pre_create``.
    id: str
    #: The declared length; None while it is deferred (``Upload-Defer-Length: 1``).
    size: int | None
    #: Durable offset: bytes stored.
    offset: int
    #: The client's metadata (sanitized ``filename``).
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: ``"partial"``, ``"final"`` or None (tus ``concatenation``).
    concat: str | None = None
    #: Ids of the partial uploads a final upload is made of.
    parts: tuple[str, ...] = ()
    #: The partial file while receiving, the final file once complete.
    path: str = ""
    #: Hex sha256 of the whole file once complete.
    sha256: str | None = None
    #: True once the file is complete.
    complete: bool = False
    #: When the upload expires if it stays idle (``time.time()`` seconds); None once
    #: every byte is stored.
    expires: float | None = None


def upload_info(sink: ChunkedUploadSink) -> UploadInfo:
    """The :class:`UploadInfo` of an upload's sink now."""
    return UploadInfo(
        id=sink.id,
        size=None if sink.deferred else sink.size,
        offset=sink.offset,
        metadata=dict(sink.metadata),
        concat=sink.concat,
        parts=sink.parts,
        path=sink.path,
        sha256=sink.sha256,
        complete=sink.state.status is UploadStatus.COMPLETE,
        expires=None if sink.state.is_stored else sink.state.expires_at(sink.store.expire_after),
    )


@dataclass(frozen=True, slots=True)
class UploadStats:
    """A snapshot of an :class:`UploadStore`'s counters (see :meth:`UploadStore.stats`).

    ``open_files`` and ``cached`` are gauges (now); the rest are counters, since the
    store was created.
    """

    #: Uploads created.
    created: int = field(default=0, metadata=COUNTER)
    #: Uploads finished (final file renamed into place).
    completed: int = field(default=0, metadata=COUNTER)
    #: Uploads terminated by ``abort()`` / tus DELETE.
    aborted: int = field(default=0, metadata=COUNTER)
    #: Partial uploads removed by :meth:`UploadStore.sweep` (expired).
    expired: int = field(default=0, metadata=COUNTER)
    #: Partial files read again to compute their sha256: an upload reopened from disk
    #: (after a restart or an eviction from the in-memory cache), or, with shared
    #: state, finished by a store after another store appended to it (hashed once, at
    #: finish).
    rehashed: int = field(default=0, metadata=COUNTER)
    #: Checksummed segments rejected (mismatch or interrupted) and truncated away.
    checksum_mismatches: int = field(default=0, metadata=COUNTER)
    #: Storage write failures (ENOSPC, EIO, ...).
    storage_errors: int = field(default=0, metadata=COUNTER)
    #: Bytes durably stored.
    bytes_stored: int = field(default=0, metadata=COUNTER)
    #: Requests refused because another writer held the upload, or (a PATCH appended
    #: without the lock, see :meth:`UploadStore.open_append`) committed first.
    lock_conflicts: int = field(default=0, metadata=COUNTER)
    #: Writers that asked the holder of an upload to let go, and got it (see
    #: :meth:`ChunkedUploadSink.take_over`).
    takeovers: int = field(default=0, metadata=COUNTER)
    #: Idle upload states dropped from the in-memory cache (``max_cached`` policy).
    evicted: int = field(default=0, metadata=COUNTER)
    #: Completed uploads removed (tus DELETE of a completed upload, :meth:`ChunkedUploadSink.delete`).
    deleted: int = field(default=0, metadata=COUNTER)
    #: Partial-file descriptors open now (never more than ``max_open_files``; gauge).
    open_files: int = field(default=0, metadata=GAUGE)
    #: Descriptors of idle uploads closed to stay within ``max_open_files`` (least
    #: recently used first; reopened on the next write, offset and hashes kept).
    files_closed: int = field(default=0, metadata=COUNTER)
    #: Times a write waited for a descriptor because every one in the budget was busy.
    file_waits: int = field(default=0, metadata=COUNTER)
    #: Upload states held in the in-memory cache now (``max_cached``, exceeded only
    #: while more are in use; gauge).
    cached: int = field(default=0, metadata=GAUGE)
    #: Uploads being received now: a request or WebSocket holds their writer lock (gauge).
    active: int = field(default=0, metadata=GAUGE)
    #: Final uploads assembled from partial uploads (tus ``concatenation``).
    concatenated: int = field(default=0, metadata=COUNTER)
    #: Uploads refused by a hook (``pre_create`` or ``pre_finish`` raised ``UploadError``).
    hook_rejections: int = field(default=0, metadata=COUNTER)
    #: Exceptions raised by ``post_*`` hooks (logged; the client's answer is unchanged).
    hook_errors: int = field(default=0, metadata=COUNTER)
    #: Requests answered with an error status by a transport (tus handler), per status
    #: code: ``(("400", n), ("403", n), ...)``.
    refused: tuple[tuple[str, int], ...] = field(default=(), metadata=TALLY)
    #: Requests answered 503 because the shared upload state (Redis) was unreachable
    #: (:class:`~tornado_longconn.upload_state.UploadStateUnavailable`).
    state_errors: int = field(default=0, metadata=COUNTER)
    #: Requests refused by an upload quota (:mod:`tornado_longconn.upload_quota`:
    #: 413 over the total, 429 over the bytes in flight).
    quota_refusals: int = field(default=0, metadata=COUNTER)


@dataclass(slots=True)
class _UploadCounters:
    """The store's live counters (see :class:`UploadStats` for their meaning)."""

    created: int = 0
    completed: int = 0
    aborted: int = 0
    expired: int = 0
    rehashed: int = 0
    checksum_mismatches: int = 0
    storage_errors: int = 0
    bytes_stored: int = 0
    lock_conflicts: int = 0
    takeovers: int = 0
    evicted: int = 0
    deleted: int = 0
    files_closed: int = 0
    file_waits: int = 0
    concatenated: int = 0
    hook_rejections: int = 0
    hook_errors: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    state_errors: int = 0
    quota_refusals: int = 0


def _storage_error(exc: OSError) -> UploadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        err = UploadError(f"storage full: {exc.strerror}", status=507)
    else:
        err = UploadError(f"storage error: {exc.strerror or exc}", status=500)
    err.__cause__ = exc
    return err


def _pending(data: Mapping[str, Any] | None) -> list[tuple[int, int, str]]:
    """The committed segments a shared record lists (``pending``; see ``commit``)."""
    listed = None if data is None else data.get("pending")
    if not listed:  # None, [] or {} (an empty list after a Lua round trip)
        return []
    return [(int(start), int(length), str(name)) for start, length, name in listed]


def _refusal(
    reason: str | None, offset: int, current: int, counters: _UploadCounters
) -> UploadError:
    """The ``UploadError`` of a refused commit (see ``CommitResult.reason``)."""
    if reason in ("offset", "locked"):
        counters.lock_conflicts += 1
    if reason == "locked":
        return UploadError("another request is writing this upload", status=423)
    if reason == "complete":
        return UploadError("upload is already complete", status=409)
    if reason == "size":
        return UploadError("the bytes pass the declared size", status=413)
    if reason == "expired":
        return UploadError("upload expired", status=410)
    return UploadError(
        f"Upload-Offset {offset} does not match the current offset {current}", status=409
    )


#: errno values of copy_file_range that mean "not here": copy through user space.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def _copy_range(src: int, dst: int, length: int, dst_offset: int) -> None:
    """Copy ``length`` bytes from the start of ``src`` to ``dst`` at ``dst_offset``.

    ``os.copy_file_range`` (in the kernel: no copy through Python, a reflink where the
    file system shares blocks), else ``pread``/``pwrite`` in 1 MiB blocks.
    """
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while done < length and copy is not None:
        try:
            n = copy(src, dst, length - done, done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            copy = None
            break
        if n == 0:
            raise OSError(errno.EIO, "a committed segment is shorter than recorded")
        done += n
    while done < length:
        block = os.pread(src, min(1 << 20, length - done), done)
        if not block:
            raise OSError(errno.EIO, "a committed segment is shorter than recorded")
        view = memoryview(block)
        while view:
            written = os.pwrite(dst, view, dst_offset + done)
            view = view[written:]
            done += written


class ChunkedUploadSink:
    """Receives the chunks of ONE upload and stores them without blocking the loop.

    Made by :meth:`UploadStore.create` / :meth:`UploadStore.open`, never directly.
    Use from the event loop thread only. Typical use::

        sink = await store.open(upload_id)
        with sink.lock():                    # one writer at a time (else 423/409)
            sink.state.check_offset(client_offset)
            for chunk in chunks:
                await sink.write(chunk)      # waits only when the window is full
            offset = await sink.flush()      # everything on disk; durable offset
        if sink.state.is_stored:
            path = await sink.finish()

    Writes are coalesced to ``chunk_size`` bytes and written by one executor job at a
    time (in order), which also updates the sha256; at most ``max_in_flight`` such
    chunks wait, so memory is bounded by ``(max_in_flight + 1) * chunk_size``.
    """

    def __init__(
        self,
        store: UploadStore,
        upload_id: str,
        state: UploadState,
        metadata: dict[str, str],
        created: float,
        fd: int,
        sha256: _Hasher | None,
    ) -> None:
        self.store = store
        #: The server-generated upload id (32 hex digits).
        self.id = upload_id
        #: The I/O-free offset/size/status state.
        self.state = state
        #: Sanitized client metadata (``filename`` is passed through
        #: :func:`sanitize_filename`).
        self.metadata = metadata
        #: Creation time (``time.time()``).
        self.created = created
        self._fd = fd
        #: Executor jobs using ``_fd`` right now (the store never closes it then).
        self._fd_users = 0
        self._fd_opening: asyncio.Future[None] | None = None
        #: Set when the store dropped this handle (eviction, finish, abort, close).
        self._retired = False
        self._sha256 = sha256
        self._buffer = bytearray()
        self._queue: deque[bytes | memoryview] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._error: UploadError | None = None
        self._locked = False
        self._let_go: Callable[[], Awaitable[None]] | None = None
        self._segment: tuple[int, _Hasher | None, _Hasher, str, bytes] | None = None
        self._final_sha256: str | None = None
        #: ``"partial"`` (a part of a later concatenation), ``"final"`` (made by
        #: :meth:`UploadStore.concatenate`) or None (an ordinary upload).
        self.concat: str | None = None
        #: The ids a final upload was concatenated from (empty otherwise).
        self.parts: tuple[str, ...] = ()
        #: With shared state: the generation this process's view of the upload is
        #: valid for (-1: loaded without the lock, never trusted for writing).
        self.generation = 0
        self._shared_owner: str | None = None
        self._renewal: asyncio.Task[None] | None = None
        # An append handle (UploadStore.open_append): the name of its segment file,
        # the upload offset its first byte goes to, the generation its running sha256
        # is valid for, and whether it was committed (or dropped) already.
        self._segment_name: str | None = None
        self._base = 0
        self._append_gen = -2
        self._append_done = False
        # Pending segments this process saw merged (reported at its next commit).
        self._merged_names: tuple[str, ...] = ()
        #: Optional ``callback(durable_offset, error)``, called on the event loop after
        #: each write job is stored (``error`` None) or failed (``error`` the
        #: ``UploadError``, which :meth:`write`/:meth:`flush` still raise once).
        #: Used to acknowledge chunks while later ones are being read.
        self.stored_callback: Callable[[int, UploadError | None], None] | None = None

    # -- properties -----------------------------------------------------------------

    @property
    def offset(self) -> int:
        """The durable offset: bytes stored in the partial file."""
        return self.state.offset

    @property
    def size(self) -> int:
        """The declared size of the upload."""
        return self.state.size

    def info(self) -> UploadInfo:
        """A snapshot of this upload (:class:`UploadInfo`, what hooks receive)."""
        return upload_info(self)

    @property
    def _fd_key(self) -> str:
        """The key of this handle's descriptor in the store's budget."""
        name = self._segment_name
        return self.id if name is None else f"{self.id}.{name}"

    async def end_append(self) -> int:
        """Commit the bytes of an append handle; return the durable offset.

        See :meth:`UploadStore.open_append`; a handle of :meth:`UploadStore.lock_for_write`
        has nothing to commit here and returns its offset. Raises ``UploadError`` when
        the commit is refused (409 another writer committed first, 423 locked, 404, 410,
        413, 503 shared state unreachable): the bytes are then discarded.
        """
        return await self.store.commit_append(self)

    async def end_write(self) -> None:
        """Record the upload and let the writer lock go (:meth:`UploadStore.end_write`)."""
        await self.store.end_write(self)

    def release_later(self) -> None:
        """:meth:`end_write` from synchronous code (see :meth:`UploadStore.release_later`)."""
        self.store.release_later(self)

    @property
    def deferred(self) -> bool:
        """True while the upload's length is not declared yet (``creation-defer-length``)."""
        return self.state.deferred

    async def declare_length(self, size: int) -> None:
        """Declare the length of a deferred upload, and record it in ``<id>.info``.

        Raises ``UploadError`` as :meth:`UploadState.declare_length` does (400 for a
        length that differs from one already declared or is below the bytes received,
        413 above ``max_size``), or the storage error (the length stays deferred).
        """
        if not self.state.deferred:
            self.state.declare_length(size)
            return
        self.state.declare_length(size)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.store.executor, self.store._update_info, self.id, {"size": size}
            )
        except OSError as exc:
            self.state.deferred = True
            self.state.size = self.state.max_size
            self.store._counters.storage_errors += 1
            raise _storage_error(exc) from exc

    @property
    def filename(self) -> str:
        """The sanitized original file name (``"upload"`` if none was given)."""
        return self.metadata.get("filename", "upload")

    @property
    def locked(self) -> bool:
        """True while a writer holds :meth:`lock`."""
        return self._locked

    @property
    def error(self) -> UploadError | None:
        """The storage error not yet raised by :meth:`write`/:meth:`flush`, if any."""
        return self._error

    @property
    def sha256(self) -> str | None:
        """Hex sha256 of the whole file, once :meth:`finish` succeeded (else ``None``)."""
        return self._final_sha256

    @property
    def path(self) -> str:
        """Where the file is: the partial file while active, the final file once complete."""
        if self.state.status is UploadStatus.COMPLETE:
            return self.store.final_path(self.id)
        return self.store.partial_path(self.id)

    # -- locking --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[ChunkedUploadSink]:
        """Context manager: hold this upload for one writer.

        Raises :class:`~tornado_longconn.exceptions.UploadError` with status 423
        (Locked) if another writer holds it; the caller answers 423 (HTTP) or closes
        with ``UPLOAD_CONFLICT`` (WebSocket). Prefer :meth:`acquire`/:meth:`release`
        when the hold spans callbacks (a streamed request).
        """
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self, let_go: Callable[[], Awaitable[None]] | None = None) -> None:
        """Take the writer lock without waiting; raises ``UploadError`` 423 if held.

        ``let_go``, if given, is how a later writer may ask this one to give the
        upload up (:meth:`take_over`): a callable that stops this writer, stores
        what it accepted, calls :meth:`release` and returns an awaitable that
        completes once it did. Without it the lock can only be waited out.
        """
        if self._locked:
            self.store._counters.lock_conflicts += 1
            raise UploadError("another request is writing this upload", status=423)
        self._locked = True
        self._let_go = let_go

    async def take_over(
        self, let_go: Callable[[], Awaitable[None]] | None = None, *, timeout: float = 10.0
    ) -> None:
        """Take the writer lock, asking its holder to let go first if it allows that.

        For a client that reconnected while the server still believes in its old
        connection (a phone that changed networks leaves a half-open TCP connection
        behind, which only a heartbeat or TCP itself notices, after seconds or
        minutes): the newer writer wins, as in tusd's lock release requests. The
        holder's ``let_go`` (see :meth:`acquire`) stores what it accepted and
        releases within ``timeout`` seconds; the durable offset is then final for
        the newcomer. Raises ``UploadError`` 423 if the holder gave no ``let_go``
        (an HTTP request: tus keeps its 423) or did not let go in time.
        """
        await self.request_release(timeout=timeout)
        self.acquire(let_go)

    async def request_release(self, *, timeout: float = 10.0) -> bool:
        """Ask the holder of the writer lock to let go, if it allows that (see :meth:`take_over`).

        Returns True if the lock is free afterwards (also when nobody held it). The
        holder's ``let_go`` runs shielded: one slower than ``timeout`` still finishes.
        """
        holder = self._let_go
        if self._locked and holder is not None:
            self._let_go = None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(holder()), timeout)
            if not self.locked:  # the holder let go
                self.store._counters.takeovers += 1
        return not self._locked

    def release(self) -> None:
        """Give the writer lock back (idempotent)."""
        was_locked = self._locked
        self._locked = False
        self._let_go = None
        if was_locked:
            self.store._writer_released()

    # -- writing --------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> asyncio.Future[None]:
        """Queue ``data`` (the next bytes of the upload) for storage.

        ``data`` is kept by reference until it is written (no copy for a full
        chunk): do not modify it afterwards.

        Returns a future that resolves when the sink has room for more (at most
        ``max_in_flight`` chunks waiting): return it from ``data_received`` or
        ``on_message`` for inbound flow control. The future never fails; a storage
        error is raised by the next :meth:`write` or by :meth:`flush`.

        Raises ``UploadError``: 413 if ``data`` passes the declared size, 404/409 if
        the upload is no longer active, 507/500 after a storage error (the durable
        offset is what reached the disk). A storage error is raised once; after it
        the sink accepts writes again from the durable offset.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._retired and self.state.status is UploadStatus.ACTIVE:
            raise UploadError("this upload handle was closed; open the upload again", status=409)
        self.state.accept(len(data))
        if not data:
            return self._done_future()
        if not self._buffer and len(data) >= self.store.chunk_size:
            self._queue.append(data)
        else:
            self._buffer += data
            if len(self._buffer) < self.store.chunk_size:
                return self._done_future()
            self._queue.append(bytes(self._buffer))
            self._buffer.clear()
        self._start_writer()
        return self._room_future()

    def _room_future(self) -> asyncio.Future[None]:
        if len(self._queue) < self.store.max_in_flight:
            return self._done_future()
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        return self._room

    def commit(self) -> asyncio.Future[None]:
        """Hand the buffered bytes to the writer now, without waiting for the disk.

        Makes the bytes written so far one write job of their own (so
        :attr:`stored_callback` reports exactly this boundary). Returns the same kind
        of future as :meth:`write`: resolved once fewer than ``max_in_flight`` jobs
        wait.
        """
        if self._buffer and self._error is None:
            self._queue.append(bytes(self._buffer))
            self._buffer.clear()
            self._start_writer()
        return self._room_future()

    async def flush(self) -> int:
        """Store every queued byte; return the durable offset.

        Raises the storage ``UploadError`` (507 when the disk is full, 500 for other
        I/O errors) if a write failed; the sink then clears the error, so the client
        can resume from the returned-by-HEAD offset later.
        """
        if self._buffer and self._error is None:
            self._queue.append(bytes(self._buffer))
            self._buffer.clear()
            self._start_writer()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            self._buffer.clear()
            raise error
        return self.state.offset

    def _done_future(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._run_writer())

    async def _run_writer(self) -> None:
        loop = asyncio.get_running_loop()
        store = self.store
        try:
            while self._queue:
                data = self._queue[0]
                hashers: list[_Hasher] = [] if self._sha256 is None else [self._sha256]
                if self._segment is not None:
                    hashers.append(self._segment[2])
                try:
                    fd = await self._use_fd()
                    try:
                        await loop.run_in_executor(
                            store.executor,
                            store._write_chunk,
                            fd,
                            data,
                            self.offset - self._base,
                            hashers,
                        )
                    finally:
                        self._done_fd()
                except Exception as exc:
                    store._counters.storage_errors += 1
                    if isinstance(exc, OSError):
                        self._error = _storage_error(exc)
                    else:
                        self._error = UploadError(f"storage error: {exc!r}", status=500)
                        self._error.__cause__ = exc
                    self._queue.clear()
                    self._buffer.clear()
                    self.state.drop_queued()
                    if self.stored_callback is not None:
                        self.stored_callback(self.offset, self._error)
                    return
                self._queue.popleft()
                self.state.stored(len(data), time.time())
                store._counters.bytes_stored += len(data)
                if self.stored_callback is not None:
                    self.stored_callback(self.offset, None)
                room = self._room
                if len(self._queue) < store.max_in_flight and room is not None and not room.done():
                    room.set_result(None)
        finally:
            if self._room is not None and not self._room.done():
                self._room.set_result(None)

    # -- checksummed segments -------------------------------------------------------

    async def begin_segment(self, algorithm: str, expected: bytes) -> None:
        """Start a segment whose bytes must hash to ``expected`` with ``algorithm``.

        Flushes first, records the start offset in ``<id>.seg`` (so a crash inside
        the segment is rolled back on the next open) and snapshots the sha256 state.
        End it with :meth:`end_segment` (verify) or :meth:`rollback_segment`. Raises
        ``UploadError`` 400 for an algorithm not in :data:`CHECKSUM_ALGORITHMS`.
        """
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise UploadError(f"unsupported checksum algorithm {algorithm!r}", status=400)
        if self._segment is not None:
            raise UploadError("a checksummed segment is already open", status=409)
        start = await self.flush()
        if self._segment_name is None:  # an append handle's file is dropped as a whole
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                self.store.executor, self.store._write_marker, self.id, start
            )
        hasher: _Hasher = hashlib.new(algorithm)
        before = None if self._sha256 is None else self._sha256.copy()
        self._segment = (start, before, hasher, algorithm, expected)

    async def end_segment(self) -> int:
        """Flush and verify the open segment; return the durable offset.

        On a mismatch the segment's bytes are truncated away, the offset goes back to
        where the segment started, and ``UploadError`` 460 is raised.
        """
        segment = self._segment
        if segment is None:
            return await self.flush()
        try:
            await self.flush()
        except UploadError:
            await self.rollback_segment()
            raise
        if self._segment is not segment:  # rolled back meanwhile (the writer gave up)
            raise UploadError("the checksummed segment was discarded", status=409)
        _, _, hasher, algorithm, expected = segment
        if hasher.digest() != expected:
            await self.rollback_segment()
            raise UploadError(f"{algorithm} checksum mismatch; chunk discarded", status=460)
        self._segment = None
        if self._segment_name is None:
            await asyncio.get_running_loop().run_in_executor(
                self.store.executor, self.store._remove_marker, self.id
            )
        return self.offset

    async def rollback_segment(self) -> int:
        """Discard the open segment (truncate back to its start); return the offset."""
        segment, self._segment = self._segment, None
        if segment is None:
            return self.offset
        try:
            await self.flush()
        except UploadError:
            pass
        start, sha_before, _, _, _ = segment
        self.store._counters.checksum_mismatches += 1
        fd = await self._use_fd()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.store.executor,
                self.store._truncate,
                fd,
                self.id,
                start - self._base,
                self._segment_name is None,
            )
        finally:
            self._done_fd()
        self._sha256 = sha_before
        self.state.rewind(start, time.time())
        return start

    @property
    def in_segment(self) -> bool:
        """True between :meth:`begin_segment` and its end."""
        return self._segment is not None

    # -- finishing ------------------------------------------------------------------

    async def finish(self, *, expected_sha256: str | None = None) -> str:
        """Complete the upload atomically and return the final file's path.

        Flushes, ``fsync``\\ s the partial file, checks the whole-file sha256 against
        ``expected_sha256`` (hex, optional), renames ``<id>.part`` to ``<id>`` and
        ``fsync``\\ s the directory, then records the digest in ``<id>.info``.
        Raises ``UploadError`` 409 if bytes are missing, 460 if the sha256 differs
        (the upload is then aborted: its bytes cannot be trusted), or the storage error.
        """
        await self.flush()
        if not self.state.is_stored:
            self.state.complete()  # raises the 409 (or 404 once aborted)
        if self._sha256 is None:  # reloaded after another process wrote: hash it once now
            try:
                fd = await self._use_fd()
            except OSError as exc:
                raise _storage_error(exc) from exc
            try:
                self._sha256 = await asyncio.get_running_loop().run_in_executor(
                    self.store.executor, self.store._hash_fd, fd, self.offset
                )
            finally:
                self._done_fd()
            self.store._counters.rehashed += 1
        digest = self._sha256.hexdigest()
        if expected_sha256 is not None and expected_sha256.lower() != digest:
            await self.abort()
            raise UploadError("sha256 of the upload does not match; upload discarded", status=460)
        self.state._check_active()
        try:
            fd = await self._use_fd()
        except OSError as exc:
            raise _storage_error(exc) from exc
        try:
            self.state.complete()
        except UploadError:
            self._done_fd()
            raise
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self.store.executor, self.store._finish_files, fd, self.id, digest
            )
        finally:
            self._fd_closed_by_job()
        self._final_sha256 = digest
        self.store._counters.completed += 1
        self.store._forget(self.id)
        return self.store.final_path(self.id)

    async def abort(self) -> None:
        """Terminate the upload: stop writing, delete its files (idempotent).

        Policy: an aborted upload is gone; its id answers 404 from then on. A
        completed upload is not touched (:meth:`delete` removes it).
        """
        if self.state.status is UploadStatus.COMPLETE:
            return
        if self.state.status is UploadStatus.ABORTED and self._retired:
            return
        self.state.abort()
        self._queue.clear()
        self._buffer.clear()
        if self._writer is not None and not self._writer.done():
            try:
                await asyncio.shield(self._writer)
            except Exception:
                pass
        if self._fd_opening is not None:
            await asyncio.shield(self._fd_opening)
        fd = self._fd
        if fd >= 0:
            self._fd_users += 1
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.store.executor, self.store._delete_files, fd, self.id
            )
        finally:
            if fd >= 0:
                self._fd_closed_by_job()
        self.store._counters.aborted += 1
        self.store._forget(self.id)
        if self.store.shared is not None:
            await self.store.shared.delete(self.id)

    async def delete(self) -> None:
        """Remove the upload whatever its status; its id answers 404 from then on.

        A partial upload is aborted (:meth:`abort`). A completed one loses its final
        file (if it is still at ``store.final_path(id)``; a file the application moved
        elsewhere is not touched) and its ``<id>.info`` record; counted as
        ``deleted``. Idempotent.
        """
        if self.state.status is not UploadStatus.COMPLETE:
            await self.abort()
            return
        self.state.abort()
        await asyncio.get_running_loop().run_in_executor(
            self.store.executor, self.store._delete_completed, self.id
        )
        self.store._counters.deleted += 1
        self.store._forget(self.id)
        if self.store.shared is not None:
            await self.store.shared.delete(self.id)

    # -- the partial file's descriptor (bounded by the store's max_open_files) --------

    async def _use_fd(self) -> int:
        """The partial file's descriptor for one executor job, reopened if it was closed.

        Pair with :meth:`_done_fd`. Raises ``OSError`` if the file cannot be opened.
        """
        store = self.store
        while self._fd_opening is not None:
            await asyncio.shield(self._fd_opening)
        if self._fd >= 0:
            store._touch_fd(self)
        else:
            loop = asyncio.get_running_loop()
            opening = self._fd_opening = loop.create_future()
            try:
                await store._reserve_fd()
                try:
                    if self._segment_name is None:
                        fd = await loop.run_in_executor(
                            store.executor, store._open_partial, self.id
                        )
                    else:
                        fd = await loop.run_in_executor(
                            store.executor, store._open_segment, self.id, self._segment_name
                        )
                except BaseException:
                    store._unreserve_fd()
                    raise
                self._fd = fd
                store._fd_opened(self)
            finally:
                self._fd_opening = None
                opening.set_result(None)
        self._fd_users += 1
        return self._fd

    def _done_fd(self) -> None:
        self._fd_users -= 1
        if self._fd_users == 0:
            self.store._wake_fd_waiter()

    def _fd_closed_by_job(self) -> None:
        """The executor job closed ``_fd`` itself (finish, abort): forget it."""
        self._fd_users -= 1
        self._fd = -1
        self._retired = True
        self.store._fd_gone(self)

    def _close_fd(self) -> None:
        """Close the descriptor now (store eviction/close); the handle is retired."""
        self._retired = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.store._fd_gone(self)


class UploadStore:
    """A storage root for uploads: creates, reopens, expires and counts them.

    Arguments (defaults in brackets):

    * ``root`` -- directory for every upload file (created if missing).
    * ``max_size`` [1 GiB] -- largest declared size accepted (tus ``Tus-Max-Size``);
      above it, creation is refused with 413.
    * ``chunk_size`` [1 MiB] -- bytes per executor write job.
    * ``max_in_flight`` [2] -- chunks queued per upload before ``write()`` makes the
      caller wait.
    * ``expire_after`` [86400 s] -- an idle partial upload expires this long after its
      last stored byte; :meth:`sweep` removes it.
    * ``max_cached`` [1000] -- upload states (offset, hash state) kept in memory;
      past it the least recently used idle one is dropped (counted as ``evicted``) and
      rebuilt by re-hashing if it is opened again.
    * ``max_open_files`` [None: :func:`default_max_open_files`, a quarter of the soft
      ``RLIMIT_NOFILE``, at least 16, at most 4096] -- partial-file descriptors held
      open at once. An upload holds one only while it is being written and until the
      budget needs it back: past the budget the least recently used idle one is
      closed (counted as ``files_closed``) and reopened on its next write, its offset
      and running hashes intact (no re-hash). When every descriptor in the budget is
      in use by a write, the next write waits for one (``file_waits``). Creating or
      reopening an upload holds none. (Short-lived descriptors of the executor jobs
      -- ``<id>.info`` writes, the re-hash read -- are outside the budget; at most one
      per executor thread.)
    * ``executor`` [None: the loop's default executor] -- where file I/O runs.
    * ``shared`` [None] -- a :class:`~tornado_longconn.upload_state.SharedUploadState`
      (e.g. :class:`~tornado_longconn.upload_state.RedisUploadState`) when several
      processes serve this ``root`` (a shared disk): offsets and metadata are recorded
      in it, a tus PATCH appends through a segment file and one commit
      (:meth:`open_append`), other writers take its lock (423 while another process
      writes), and a process reloads an upload another process wrote (see
      :mod:`tornado_longconn.upload_state`). A lost record (a flushed Redis) is
      rebuilt from the disk by the upload's next writer.
    * ``lock_ttl`` [30 s] -- with ``shared``: the writer lock's expiry; the holder
      extends it every ``lock_ttl / 3`` while it writes, so a dead process frees its
      uploads after at most this long.

    Storage faults can be injected by overriding :meth:`write_at`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_size: int = 1 << 30,
        chunk_size: int = 1 << 20,
        max_in_flight: int = 2,
        expire_after: float = 86400.0,
        max_cached: int = 1000,
        max_open_files: int | None = None,
        executor: concurrent.futures.Executor | None = None,
        shared: SharedUploadState | None = None,
        lock_ttl: float = 30.0,
    ) -> None:
        if lock_ttl <= 0:
            raise ValueError("lock_ttl must be positive")
        if chunk_size <= 0 or max_in_flight <= 0 or max_cached <= 0 or max_size < 0:
            raise ValueError("chunk_size, max_in_flight and max_cached must be positive")
        if max_open_files is None:
            max_open_files = default_max_open_files()
        if max_open_files <= 0:
            raise ValueError("max_open_files must be positive")
        self.root = os.path.realpath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self.max_size = max_size
        self.chunk_size = chunk_size
        self.max_in_flight = max_in_flight
        self.expire_after = expire_after
        self.max_cached = max_cached
        self.max_open_files = max_open_files
        self.executor = executor
        self.shared = shared
        self.lock_ttl = lock_ttl
        self._counters = _UploadCounters()
        self._sinks: dict[str, ChunkedUploadSink] = {}
        self._opening: dict[str, asyncio.Future[ChunkedUploadSink]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Sinks holding a partial-file descriptor, least recently used first.
        self._open_fds: OrderedDict[str, ChunkedUploadSink] = OrderedDict()
        self._fd_reserved = 0
        self._fd_waiters: deque[asyncio.Future[None]] = deque()
        # Set when a writer lock is released while someone waits in wait_writers.
        self._released: asyncio.Event | None = None
        # Append handles receiving a body now (open_append .. end_write).
        self._appending: set[ChunkedUploadSink] = set()

    # -- paths (ids only, never client names) ---------------------------------------

    def _checked(self, upload_id: str) -> str:
        if not is_upload_id(upload_id):
            raise UploadError("no such upload", status=404)
        return upload_id

    def partial_path(self, upload_id: str) -> str:
        """Path of the partial file ``<root>/<id>.part``; 404 ``UploadError`` for a bad id."""
        return os.path.join(self.root, self._checked(upload_id) + ".part")

    def final_path(self, upload_id: str) -> str:
        """Path of the completed file ``<root>/<id>``."""
        return os.path.join(self.root, self._checked(upload_id))

    def info_path(self, upload_id: str) -> str:
        """Path of the JSON metadata file ``<root>/<id>.info``."""
        return os.path.join(self.root, self._checked(upload_id) + ".info")

    def _marker_path(self, upload_id: str) -> str:
        return os.path.join(self.root, self._checked(upload_id) + ".seg")

    # -- public API -----------------------------------------------------------------

    async def create(
        self,
        size: int | None,
        *,
        metadata: Mapping[str, str] | None = None,
        now: float | None = None,
        concat: str | None = None,
        parts: Sequence[str] = (),
    ) -> ChunkedUploadSink:
        """Create a new upload of ``size`` bytes and return its sink.

        ``size`` None defers the length (tus ``creation-defer-length``): the upload
        accepts up to ``max_size`` bytes until :meth:`ChunkedUploadSink.declare_length`.
        ``metadata`` is kept (``filename``, and ``name`` as a fallback, sanitized by
        :func:`sanitize_filename`; other values cut to 1024 characters). ``concat`` is
        ``"partial"`` for a part of a later concatenation (tus ``Upload-Concat:
        partial``), ``"final"`` (with the ``parts`` ids) for one made by
        :meth:`concatenate`, else None. Raises ``UploadError`` 413 if ``size >
        max_size``, 400 if negative, 507/500 if the files cannot be created.
        """
        if concat not in (None, "partial", "final"):
            raise ValueError(f"concat must be None, 'partial' or 'final', not {concat!r}")
        now = time.time() if now is None else now
        state = UploadState(size=size, max_size=self.max_size, now=now)
        clean = {str(k)[:64]: str(v)[:1024] for k, v in (metadata or {}).items()}
        raw_name = clean.get("filename") or clean.get("name")
        if raw_name is not None:
            clean["filename"] = sanitize_filename(raw_name)
        upload_id = secrets.token_hex(16)
        info: dict[str, Any] = {"id": upload_id, "size": size, "metadata": clean, "created": now}
        if concat is not None:
            info.update(concat=concat, parts=list(parts))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._create_files, upload_id, info)
        except OSError as exc:
            self._counters.storage_errors += 1
            raise _storage_error(exc) from exc
        sink = ChunkedUploadSink(self, upload_id, state, clean, now, -1, hashlib.sha256())
        sink.concat = concat
        sink.parts = tuple(parts)
        if self.shared is not None:
            await self.shared.put(upload_id, self._record(sink))
        self._counters.created += 1
        self._remember(sink)
        return sink

    async def concatenate(
        self,
        part_ids: Sequence[str],
        *,
        metadata: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> ChunkedUploadSink:
        """Make a completed upload from completed partial uploads, in order (tus ``final``).

        Every id must name an upload created with ``concat="partial"`` and complete.
        The bytes are copied in the executor into a new upload (the partials stay;
        delete them if you no longer need them), hashed, and finished atomically like
        any upload. Returns the completed sink (``concat == "final"``, ``parts`` the
        ids). Raises ``UploadError`` before anything is created: 400 for no ids, more
        than :data:`MAX_CONCAT_PARTS`, an upload that is not a partial one or is not
        complete; 404 for an unknown id (410 expired); 413 if the total passes
        ``max_size``; 423 while another request uses one of them (a DELETE); 507/500 for
        a storage error (the new upload is then removed).
        """
        parts = await self._partials(part_ids, now)
        total = sum(part.size or 0 for part in parts)
        held: list[ChunkedUploadSink] = []
        try:
            if self.shared is None:
                for part_id in dict.fromkeys(part_ids):
                    sink = await self.open(part_id, now=now)
                    sink.acquire()  # a concurrent DELETE of a part gets 423 meanwhile
                    held.append(sink)
            sink = await self.create(
                total, metadata=metadata, now=now, concat="final", parts=list(part_ids)
            )
            loop = asyncio.get_running_loop()
            paths = [self.final_path(part.id) for part in parts]
            try:
                fd = await sink._use_fd()
                try:
                    hasher = await loop.run_in_executor(
                        self.executor, self._copy_parts, fd, paths, total
                    )
                finally:
                    sink._done_fd()
            except BaseException as exc:
                await sink.abort()
                self._counters.aborted -= 1
                if isinstance(exc, OSError):
                    self._counters.storage_errors += 1
                    raise _storage_error(exc) from exc
                raise
            sink._sha256 = hasher
            sink.state.accept(total)
            sink.state.stored(total, time.time())
            self._counters.bytes_stored += total
            await sink.finish()
            if self.shared is not None:
                await self.shared.put(sink.id, self._record(sink))
            self._counters.concatenated += 1
            return sink
        finally:
            for part in held:
                part.release()

    async def check_partials(self, part_ids: Sequence[str], *, now: float | None = None) -> int:
        """Check that ``part_ids`` can be concatenated; return their total size.

        Raises the ``UploadError`` :meth:`concatenate` would raise before creating
        anything (400, 404, 410, 413). Handlers call it before a ``pre_create`` hook.
        """
        return sum(part.size or 0 for part in await self._partials(part_ids, now))

    async def _partials(self, part_ids: Sequence[str], now: float | None) -> list[UploadInfo]:
        if not part_ids:
            raise UploadError("Upload-Concat: final needs at least one partial upload", status=400)
        if len(part_ids) > MAX_CONCAT_PARTS:
            raise UploadError(f"more than {MAX_CONCAT_PARTS} partial uploads", status=400)
        parts: list[UploadInfo] = []
        for part_id in part_ids:
            part = await self.describe(part_id, now=now)
            if part.concat != "partial":
                raise UploadError(f"upload {part_id} is not a partial upload", status=400)
            if not part.complete:
                raise UploadError(f"partial upload {part_id} is not finished", status=400)
            parts.append(part)
        total = sum(part.size or 0 for part in parts)
        if total > self.max_size:
            raise UploadError(
                f"the partial uploads add up to {total} bytes, above the maximum {self.max_size}",
                status=413,
            )
        return parts

    async def open(self, upload_id: str, *, now: float | None = None) -> ChunkedUploadSink:
        """Return the sink of an existing partial upload, rebuilding it from disk if needed.

        Rebuilding (first open in this process, or after eviction) reads the partial
        file in the executor to recompute the sha256, and rolls back an unfinished
        checksummed segment. Raises ``UploadError`` 404 for an unknown, completed-and-
        forgotten or malformed id, 410 if the upload expired (its files are removed).
        """
        self._checked(upload_id)
        now = time.time() if now is None else now
        if self.shared is not None:
            return await self._open_shared(upload_id)
        sink = self._sinks.get(upload_id)
        if sink is None:
            pending = self._opening.get(upload_id)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._opening[upload_id] = pending
                try:
                    sink = await self._load(upload_id)
                except BaseException as exc:
                    pending.set_exception(exc)
                    pending.exception()
                    raise
                else:
                    pending.set_result(sink)
                    self._remember(sink)
                finally:
                    del self._opening[upload_id]
            else:
                sink = await asyncio.shield(pending)
        if sink.state.is_expired(now, self.expire_after) and not sink.locked:
            await sink.abort()
            self._counters.aborted -= 1
            self._counters.expired += 1
            raise UploadError("upload expired", status=410)
        if self._sinks.pop(upload_id, None) is not None:
            self._sinks[upload_id] = sink  # most recently used last
        return sink

    async def describe(self, upload_id: str, *, now: float | None = None) -> UploadInfo:
        """What is known about an upload now, without reading its bytes.

        With ``shared`` state this is the shared record (no re-hash, whichever process
        wrote the upload); else the sink's state (:meth:`open`). An upload whose
        files exist but whose record is lost (a Redis flushed or replaced) is read
        from the disk (re-hashed) until its next writer records it again. Raises
        ``UploadError`` 404 for an unknown id, 410 for an expired partial upload.
        """
        self._checked(upload_id)
        if self.shared is None:
            return upload_info(await self.open(upload_id, now=now))
        now = time.time() if now is None else now
        record = await self.shared.get(upload_id)
        data = None if record is None else record.data
        if data is None:
            return upload_info(await self._load(upload_id, repair=False))
        size = data.get("size")
        offset = int(data.get("offset", 0))
        complete = data.get("status") == UploadStatus.COMPLETE.value
        stored = complete or (size is not None and offset == size)
        sha256 = data.get("sha256")
        if stored and not complete:
            # Finished by an append handle: the disk tells whether it is complete.
            sha256 = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._finished_sha256, upload_id
            )
            complete = sha256 is not None
        expires = None if stored else float(data.get("activity", 0.0)) + self.expire_after
        if expires is not None and now >= expires:
            raise UploadError("upload expired", status=410)
        return UploadInfo(
            id=upload_id,
            size=None if size is None else int(size),
            offset=offset,
            metadata={str(k): str(v) for k, v in dict(data.get("metadata") or {}).items()},
            concat=data.get("concat"),
            parts=tuple(str(part) for part in data.get("parts") or ()),
            path=self.final_path(upload_id) if complete else self.partial_path(upload_id),
            sha256=sha256,
            complete=complete,
            expires=expires,
        )

    async def lock_for_write(
        self,
        upload_id: str,
        *,
        now: float | None = None,
        let_go: Callable[[], Awaitable[None]] | None = None,
        take_over: float | None = None,
    ) -> ChunkedUploadSink:
        """Open an upload and hold it for one writer; pair with :meth:`end_write`.

        Without ``shared`` state: :meth:`open` and :meth:`ChunkedUploadSink.acquire`.
        With it: the shared lock first (``UploadError`` 423 while any process holds
        it), then the upload as the shared record says: the cached state if this
        process was its last writer, else reloaded from the disk (bytes past the
        recorded offset, left by a writer that died, are cut off). The lock is
        extended every ``lock_ttl / 3`` seconds until :meth:`end_write`. Raises 404
        for an unknown upload. ``let_go`` is passed to
        :meth:`ChunkedUploadSink.acquire`. ``take_over`` (seconds), if given, first asks
        a writer of this process that holds the upload and gave a ``let_go`` to let go
        (see :meth:`ChunkedUploadSink.take_over`); with a shared state that relays
        release requests (:class:`~tornado_longconn.upload_state.RedisUploadState`), a
        writer on another process is asked too, and the lock is taken once it let go
        (423 if it did not within ``take_over`` seconds).
        """
        if self.shared is None:
            sink = await self.open(upload_id, now=now)
            if take_over is not None:
                await sink.take_over(let_go, timeout=take_over)
            else:
                sink.acquire(let_go)
            return sink
        cached = self._sinks.get(upload_id)
        if take_over is not None and cached is not None and cached.locked:
            await cached.request_release(timeout=take_over)
        self._checked(upload_id)
        if let_go is not None:
            await self._watch_releases()
        owner = secrets.token_hex(8)
        taken = await self._lock_shared(upload_id, owner)
        if taken is None and take_over is not None:
            taken = await self._take_over_shared(upload_id, owner, take_over)
        if taken is None:
            self._counters.lock_conflicts += 1
            raise UploadError("another request is writing this upload", status=423)
        generation, record = taken
        try:
            data = None if record is None else record.data
            # No record: lost (the files are the truth until this writer records it).
            limit = None if data is None else int(data.get("offset", 0))
            cached = self._sinks.get(upload_id)
            if (
                data is not None
                and cached is not None
                and cached.generation == generation - 1
                and not cached._retired
            ):
                sink = cached
            else:
                self._forget(upload_id)
                pending = _pending(data)
                if pending:  # committed segments a writer may not have copied yet
                    await self._merge(upload_id, pending)
                sink = await self._load(upload_id, repair=True, limit=limit, hash_now=False)
                if sink.state.status is UploadStatus.ACTIVE:
                    self._remember(sink)
            sink.acquire(let_go)
        except BaseException:
            await self.shared.unlock(upload_id, owner)
            raise
        sink.generation = generation
        sink._shared_owner = owner
        sink._renewal = asyncio.get_running_loop().create_task(self._renew(sink, owner))
        return sink

    async def open_append(
        self, upload_id: str, offset: int, *, now: float | None = None
    ) -> ChunkedUploadSink | None:
        """A handle that appends at ``offset`` without taking the shared lock.

        With a ``shared`` state that can commit (both
        :class:`~tornado_longconn.upload_state.SharedUploadState` classes of the
        library), the bytes go to a segment file of their own (``<id>.<name>.seg``), so
        nothing is asked of the shared state before the body: write, flush and verify
        as with any handle, then :meth:`ChunkedUploadSink.end_append` commits the
        segment in one round trip (the record's offset moves from ``offset`` to the
        end of the bytes only if nobody committed meanwhile) and copies it into the
        partial file before it returns; :meth:`end_write` then lets the handle go
        (after a disconnect it commits what was stored, as a locked writer keeps it).

        Returns None when this store has no such state, and for an upload this
        process cannot append to without reading the shared record (unknown,
        complete, a final concatenation): use :meth:`lock_for_write` then. Raises
        ``UploadError`` 409 if ``offset`` is past the declared size.
        """
        shared = self.shared
        if shared is None or getattr(shared, "commit", None) is None:
            return None
        self._checked(upload_id)
        now = time.time() if now is None else now
        cached = self._sinks.get(upload_id)
        if cached is not None and (
            cached._retired or cached.deferred or cached.state.status is not UploadStatus.ACTIVE
        ):
            cached = None
        if cached is not None:
            size: int | None = cached.size
            metadata, created = dict(cached.metadata), cached.created
            concat, parts = cached.concat, cached.parts
        else:
            loop = asyncio.get_running_loop()
            try:
                info = await loop.run_in_executor(self.executor, self._read_info, upload_id)
            except OSError:
                return None
            if info is None or "sha256" in info:
                return None
            declared = info.get("size")
            size = None if declared is None else int(declared)
            metadata = {str(k): str(v) for k, v in dict(info.get("metadata") or {}).items()}
            created = float(info.get("created", now))
            raw_concat = info.get("concat")
            concat = raw_concat if raw_concat in ("partial", "final") else None
            parts = tuple(str(part) for part in info.get("parts") or ())
        if concat == "final":
            return None
        state = UploadState(
            size=size, max_size=max(size or 0, self.max_size), offset=offset, now=now
        )
        hasher: _Hasher | None = None
        # This process's running sha256 goes on if it wrote the bytes before ``offset``
        # (checked at commit: nobody committed since, the generation says so).
        if (
            cached is not None
            and cached._sha256 is not None
            and not cached.locked
            and cached.offset == offset == cached.state.accepted
        ):
            hasher = cached._sha256.copy()
        sink = ChunkedUploadSink(self, upload_id, state, metadata, created, -1, hasher)
        sink.concat, sink.parts = concat, parts
        sink._segment_name = secrets.token_hex(8)
        sink._base = offset
        if hasher is not None and cached is not None:
            sink._append_gen = cached.generation
        if cached is not None:
            sink._merged_names = cached._merged_names
        sink.acquire()
        self._appending.add(sink)
        return sink

    async def commit_append(self, sink: ChunkedUploadSink) -> int:
        """Commit an append handle's bytes (see :meth:`ChunkedUploadSink.end_append`)."""
        name = sink._segment_name
        if name is None or sink._append_done:
            return sink.offset
        shared = self.shared
        assert shared is not None
        sink._append_done = True
        base = sink._base
        try:
            await sink.flush()
        except BaseException:
            await self._drop_segment(sink, base)
            raise
        length = sink.offset - base
        if length == 0 or sink.state.status is not UploadStatus.ACTIVE:
            await self._drop_segment(sink, base)
            return sink.offset
        self._close_segment_fd(sink)
        try:
            result = await shared.commit(
                sink.id,
                offset=base,
                length=length,
                segment=name,
                activity=sink.state.last_activity,
                now=time.time(),
                expire_after=self.expire_after,
                merged=sink._merged_names,
            )
        except BaseException:
            await self._drop_segment(sink, base)
            raise
        if result.reason == "missing":
            return await self._commit_without_record(sink, base, length, name)
        if not result.ok:
            await self._drop_segment(sink, result.offset)
            raise _refusal(result.reason, base, result.offset, self._counters)
        segments = [*result.pending, (base, length, name)]
        try:
            await self._merge(sink.id, segments)
            sink._merged_names = tuple(segment[2] for segment in segments)
        except OSError:
            # The bytes are committed (durable in their segment): the next writer copies them.
            _log.exception("upload %s: a committed segment was not copied yet", sink.id)
            sink._merged_names = ()
        valid = sink._sha256 is not None and result.previous == sink._append_gen
        self._adopt(sink, result.previous + 1, sink._sha256 if valid else None)
        return sink.offset

    async def _commit_without_record(
        self, sink: ChunkedUploadSink, base: int, length: int, name: str
    ) -> int:
        """The record is lost (a Redis flushed): append under the lock, as the disk says."""
        try:
            regular = await self.lock_for_write(sink.id)
        except BaseException:
            await self._drop_segment(sink, base)
            raise
        try:
            if regular.offset != base:
                await self._drop_segment(sink, regular.offset)
                self._counters.lock_conflicts += 1
                raise UploadError(
                    f"Upload-Offset {base} does not match the current offset {regular.offset}",
                    status=409,
                )
            await self._merge(sink.id, [(base, length, name)])
            regular.state.accept(length)
            regular.state.stored(length, sink.state.last_activity)
            regular._sha256 = None
        finally:
            await self.end_write(regular)
        self._adopt(sink, regular.generation, None)
        return sink.offset

    def _close_segment_fd(self, sink: ChunkedUploadSink) -> None:
        if sink._fd >= 0:
            os.close(sink._fd)
            sink._fd = -1
            self._fd_gone(sink)

    async def _drop_segment(self, sink: ChunkedUploadSink, offset: int) -> None:
        """Discard an append handle's segment; its state shows ``offset`` (for answers)."""
        name = sink._segment_name
        self._close_segment_fd(sink)
        if name is not None:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self._unlink_segment, sink.id, name
            )
        sink._queue.clear()
        sink._buffer.clear()
        sink.state.offset = sink.state.accepted = offset

    def _adopt(self, sink: ChunkedUploadSink, generation: int, sha256: _Hasher | None) -> None:
        """A committed append handle becomes the upload's cached handle (on its part file)."""
        self._close_segment_fd(sink)
        sink._segment_name = None
        sink._base = 0
        sink._sha256 = sha256
        sink.generation = generation
        old = self._sinks.get(sink.id)
        if old is not None and old is not sink:
            busy = old._fd_users or old._fd_opening is not None or old.locked
            if busy or (old._writer is not None and not old._writer.done()):
                old.generation = -1  # in use: never trusted again, and not replaced
                return
            self._forget(sink.id)
        self._remember(sink)

    async def _merge(self, upload_id: str, segments: Sequence[tuple[int, int, str]]) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self._merge_files, upload_id, list(segments)
        )

    async def _watch_releases(self) -> None:
        """With a shared state that relays release requests: answer them (once started)."""
        watch = getattr(self.shared, "watch_releases", None)
        if watch is not None:
            await watch(self._release_requested)

    def _release_requested(self, upload_id: str) -> None:
        """Another process asks for ``upload_id``: a writer here that allows it lets go."""
        sink = self._sinks.get(upload_id)
        if sink is not None and sink.locked:
            self.spawn(sink.request_release(timeout=_LET_GO_TIMEOUT))

    async def _lock_shared(
        self, upload_id: str, owner: str
    ) -> tuple[int, SharedUploadRecord | None] | None:
        """Take the shared lock and read the record (one round trip where the state can)."""
        assert self.shared is not None
        both = getattr(self.shared, "lock_and_get", None)
        if both is not None:
            result: tuple[int, SharedUploadRecord | None] | None = await both(
                upload_id, owner, self.lock_ttl
            )
            return result
        generation = await self.shared.lock(upload_id, owner, self.lock_ttl)
        if generation is None:
            return None
        try:
            return generation, await self.shared.get(upload_id)
        except BaseException:
            await self.shared.unlock(upload_id, owner)
            raise

    async def _take_over_shared(
        self, upload_id: str, owner: str, timeout: float
    ) -> tuple[int, SharedUploadRecord | None] | None:
        """Ask the holder on another process to let go; then lock as :meth:`_lock_shared`."""
        shared = self.shared
        released = getattr(shared, "released", None)
        if shared is None or released is None:
            return None
        future: asyncio.Future[None] = released(upload_id)
        try:
            await shared.ask_release(upload_id)  # type: ignore[attr-defined]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            shared.forget_released(upload_id, future)  # type: ignore[attr-defined]
        return await self._lock_shared(upload_id, owner)

    async def end_write(self, sink: ChunkedUploadSink) -> None:
        """Record the upload's state in the shared state (if any), then let it go.

        Call it once the writer is done (after :meth:`ChunkedUploadSink.flush` or
        ``finish``). Errors of the shared state are logged; the lock then expires by
        itself. Idempotent.
        """
        if sink in self._appending:
            if not sink._append_done:
                try:
                    await self.commit_append(sink)
                except UploadError:
                    pass  # refused: the segment is gone, the upload unchanged
                except Exception:
                    _log.exception("upload %s: an appended segment was not committed", sink.id)
            self._appending.discard(sink)
            sink.release()
            return
        owner, sink._shared_owner = sink._shared_owner, None
        if owner is not None and self.shared is not None:
            if sink._renewal is not None:
                sink._renewal.cancel()
                sink._renewal = None
            both = getattr(self.shared, "put_and_unlock", None)
            try:
                kept = True
                if sink.state.status is not UploadStatus.ABORTED and both is not None:
                    kept = await both(sink.id, owner, self._record(sink))
                else:
                    if sink.state.status is not UploadStatus.ABORTED:
                        await self.shared.put(sink.id, self._record(sink))
                    await self.shared.unlock(sink.id, owner)
                # Our unlock added one; a lost lock means another writer: reload next time.
                sink.generation = sink.generation + 1 if kept else -1
            except Exception:
                sink.generation = -1
                _log.exception("upload %s: the shared state was not updated", sink.id)
        sink.release()

    def release_later(self, sink: ChunkedUploadSink) -> None:
        """:meth:`end_write` from synchronous code (a task the store keeps)."""
        if sink._shared_owner is None and sink not in self._appending:
            sink.release()
        else:
            self.spawn(self.end_write(sink))

    async def _renew(self, sink: ChunkedUploadSink, owner: str) -> None:
        """Extend the shared lock while it is held (a timer for the lock's deadline)."""
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                kept = await self.shared.extend(sink.id, owner, self.lock_ttl)
            except Exception:
                _log.exception("upload %s: the lock could not be extended", sink.id)
                continue
            if not kept:
                sink._error = UploadError("the upload's lock expired", status=423)
                return

    def _record(self, sink: ChunkedUploadSink) -> dict[str, Any]:
        return {
            "size": None if sink.deferred else sink.size,
            "offset": sink.offset,
            "metadata": dict(sink.metadata),
            "status": sink.state.status.value,
            "concat": sink.concat,
            "parts": list(sink.parts),
            "sha256": sink.sha256,
            "activity": sink.state.last_activity,
            "created": sink.created,
        }

    async def _open_shared(self, upload_id: str) -> ChunkedUploadSink:
        assert self.shared is not None
        record = await self.shared.get(upload_id)
        if record is None or record.data is None:
            self._forget(upload_id)
            lost = await self._load(upload_id, repair=False)  # 404 without files
            lost.generation = -1
            return lost
        cached = self._sinks.get(upload_id)
        if cached is not None and (cached.generation == record.generation or cached.locked):
            return cached
        self._forget(upload_id)
        # Without the lock: read only (another process may be writing it).
        sink = await self._load(upload_id, repair=False, limit=int(record.data.get("offset", 0)))
        sink.generation = -1
        return sink

    async def sweep(self, now: float | None = None) -> int:
        """Remove expired partial uploads (idle past ``expire_after``); return how many.

        Uploads held by a writer are skipped. Runs the directory scan in the executor.
        Call it from a timer, e.g. ``PeriodicCallback(store.sweep, 600_000)``.
        """
        now = time.time() if now is None else now
        loop = asyncio.get_running_loop()
        expired = await loop.run_in_executor(
            self.executor, self._scan_expired, now - self.expire_after
        )
        removed = 0
        for upload_id in expired:
            sink = self._sinks.get(upload_id)
            if sink is not None:
                if sink.locked or not sink.state.is_expired(now, self.expire_after):
                    continue
                await sink.abort()
                self._counters.aborted -= 1
            else:
                await loop.run_in_executor(self.executor, self._delete_files, -1, upload_id)
            if self.shared is not None:
                await self.shared.delete(upload_id)
            self._counters.expired += 1
            removed += 1
        return removed

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the store keeps a reference to until it ends.

        Handlers use it for clean-up that outlives a request (flushing after a
        disconnect). Errors other than ``UploadError`` are logged, never lost.
        """
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, UploadError):
                _log.error("upload clean-up failed", exc_info=exc, extra=log_fields())

    def stats(self) -> UploadStats:
        """A snapshot of the store's counters (:class:`UploadStats`)."""
        c = self._counters
        return UploadStats(
            created=c.created,
            completed=c.completed,
            aborted=c.aborted,
            expired=c.expired,
            rehashed=c.rehashed,
            checksum_mismatches=c.checksum_mismatches,
            storage_errors=c.storage_errors,
            bytes_stored=c.bytes_stored,
            lock_conflicts=c.lock_conflicts,
            takeovers=c.takeovers,
            evicted=c.evicted,
            deleted=c.deleted,
            open_files=len(self._open_fds),
            files_closed=c.files_closed,
            file_waits=c.file_waits,
            cached=len(self._sinks),
            active=sum(1 for sink in self._sinks.values() if sink.locked)
            + sum(1 for sink in self._appending if self._sinks.get(sink.id) is not sink),
            concatenated=c.concatenated,
            hook_rejections=c.hook_rejections,
            hook_errors=c.hook_errors,
            refused=tuple(sorted(c.refused.items())),
            state_errors=c.state_errors,
            quota_refusals=c.quota_refusals,
        )

    def count_reason(self, reason: str) -> None:
        """Count why a request was refused, besides its status (:meth:`count_refused`).

        ``"state"``: the shared state was unreachable (``stats().state_errors``);
        ``"quota"``: an upload quota refused it (``stats().quota_refusals``). The tus
        handler calls it when the store has it (other stores may leave it out).
        """
        if reason == "state":
            self._counters.state_errors += 1
        elif reason == "quota":
            self._counters.quota_refusals += 1

    def count_hook(self, *, rejected: bool) -> None:
        """Count a hook that rejected an upload (``rejected``) or raised after the fact."""
        if rejected:
            self._counters.hook_rejections += 1
        else:
            self._counters.hook_errors += 1

    async def durable_offset(self, upload_id: str) -> int:
        """The bytes of an upload stored for good (the tus ``Upload-Offset``).

        The shared record's offset with ``shared`` state, else the sink's. Raises
        ``UploadError`` 404/410 like :meth:`describe`.
        """
        return (await self.describe(upload_id)).offset

    async def read(self, upload_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Up to ``length`` bytes (all if None) of a completed upload from ``offset``.

        Reads in the executor. Raises ``UploadError`` 404 for an unknown id, 409 while
        the upload is not complete. Large files: read them in pieces, or open
        ``final_path(id)`` yourself.
        """
        info = await self.describe(upload_id)
        if not info.complete:
            raise UploadError("upload is not complete", status=409)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be >= 0")
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._read_final, upload_id, offset, length
        )

    def _read_final(self, upload_id: str, offset: int, length: int | None) -> bytes:
        try:
            with open(self.final_path(upload_id), "rb") as fh:
                fh.seek(offset)
                return fh.read() if length is None else fh.read(length)
        except FileNotFoundError as exc:
            raise UploadError("no such upload", status=404) from exc

    def count_refused(self, status: int) -> None:
        """Count a request a transport answered with error ``status`` (``stats().refused``)."""
        key = str(status)
        self._counters.refused[key] = self._counters.refused.get(key, 0) + 1

    def _writer_released(self) -> None:
        if self._released is not None:
            self._released.set()

    def _http_writers(self) -> int:
        # A writer without let_go is a request (tus PATCH, chunked PUT); one with it
        # is a WebSocket upload connection, which lasts until the connection closes.
        cached = sum(1 for sink in self._sinks.values() if sink.locked and sink._let_go is None)
        return cached + sum(1 for sink in self._appending if sink not in self._sinks.values())

    async def wait_writers(self) -> None:
        """Return once no HTTP request is writing an upload (for a graceful drain).

        WebSocket upload connections are not waited for: they hold their upload
        until the connection closes. Wrap it in ``asyncio.wait_for`` for a deadline.
        """
        while self._http_writers():
            released = self._released
            if released is None:
                released = self._released = asyncio.Event()
            released.clear()
            await released.wait()

    async def drain_tasks(self) -> None:
        """Wait for the clean-up tasks started by :meth:`spawn` (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """Close every cached upload's file descriptor (partial files stay on disk)."""
        for sink in self._sinks.values():
            sink._close_fd()
        for sink in list(self._open_fds.values()):
            sink._close_fd()
        self._sinks.clear()

    def write_at(self, fd: int, data: memoryview, offset: int) -> int:
        """Write ``data`` at ``offset`` of ``fd``; return the bytes written (executor thread).

        The storage hook: override it to inject faults (raise
        ``OSError(errno.ENOSPC, ...)``) or to write elsewhere. Default ``os.pwrite``.
        """
        return os.pwrite(fd, data, offset)

    # -- executor side --------------------------------------------------------------

    def _write_chunk(
        self, fd: int, data: bytes | memoryview, offset: int, hashers: list[_Hasher]
    ) -> None:
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view):
                pos += self.write_at(fd, view[pos:], offset + pos)
        except OSError:
            # Keep "offset = bytes on disk": drop the part of this chunk that made it.
            try:
                os.ftruncate(fd, offset)
            except OSError:
                pass
            raise
        for hasher in hashers:
            hasher.update(view)

    def _create_files(self, upload_id: str, info: dict[str, Any]) -> None:
        info_path = self.info_path(upload_id)
        tmp = info_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(tmp, info_path)
        os.close(
            os.open(
                self.partial_path(upload_id),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
            )
        )

    def _copy_parts(self, fd: int, paths: list[str], total: int) -> _Hasher:
        hasher: _Hasher = hashlib.sha256()
        pos = 0
        for path in paths:
            with open(path, "rb") as fh:
                while block := fh.read(self.chunk_size):
                    if pos + len(block) > total:
                        break
                    view = memoryview(block)
                    done = 0
                    while done < len(view):
                        done += self.write_at(fd, view[done:], pos + done)
                    hasher.update(view)
                    pos += len(block)
        if pos != total:
            raise UploadError("a partial upload changed on disk", status=409)
        return hasher

    def _update_info(self, upload_id: str, changes: dict[str, Any]) -> None:
        info_path = self.info_path(upload_id)
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
        info.update(changes)
        with open(info_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(info_path + ".tmp", info_path)

    def _open_partial(self, upload_id: str) -> int:
        return os.open(self.partial_path(upload_id), os.O_RDWR | os.O_CLOEXEC)

    def _segment_path(self, upload_id: str, name: str) -> str:
        return os.path.join(self.root, f"{self._checked(upload_id)}.{name}.seg")

    def _open_segment(self, upload_id: str, name: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        return os.open(self._segment_path(upload_id, name), flags, 0o600)

    def _unlink_segment(self, upload_id: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._segment_path(upload_id, name))

    def _segment_files(self, upload_id: str) -> list[str]:
        return glob.glob(os.path.join(glob.escape(self.root), f"{upload_id}.*.seg"))

    def _merge_files(self, upload_id: str, segments: list[tuple[int, int, str]]) -> None:
        """Copy committed segments into the partial file at their offsets, then unlink them.

        A segment already gone was copied by another writer (a segment is unlinked only
        once copied); copying one twice writes the same bytes again. A segment at offset
        0 is not copied: it becomes the partial file (a rename; nothing was committed
        before it, so the partial file holds no byte of the upload).
        """
        part = -1
        try:
            for start, length, name in segments:
                path = self._segment_path(upload_id, name)
                if start == 0:
                    if part >= 0:
                        os.close(part)
                        part = -1
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(path, self.partial_path(upload_id))
                    continue
                try:
                    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    if part < 0:
                        part = os.open(self.partial_path(upload_id), os.O_WRONLY | os.O_CLOEXEC)
                    _copy_range(src, part, length, start)
                finally:
                    os.close(src)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        finally:
            if part >= 0:
                os.close(part)

    def _read_info(self, upload_id: str) -> dict[str, Any] | None:
        """``<id>.info`` of a partial upload (with ``sha256`` once complete), or None."""
        try:
            with open(self.info_path(upload_id), encoding="utf-8") as fh:
                info = json.load(fh)
        except (FileNotFoundError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _finished_sha256(self, upload_id: str) -> str | None:
        info = self._read_info(upload_id)
        if info is None or "sha256" not in info or not os.path.exists(self.final_path(upload_id)):
            return None
        return str(info["sha256"])

    def _delete_completed(self, upload_id: str) -> None:
        for path in (self.final_path(upload_id), self.info_path(upload_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _write_marker(self, upload_id: str, start: int) -> None:
        path = self._marker_path(upload_id)
        with open(path + ".tmp", "w", encoding="ascii") as fh:
            fh.write(str(start))
        os.replace(path + ".tmp", path)

    def _remove_marker(self, upload_id: str) -> None:
        try:
            os.unlink(self._marker_path(upload_id))
        except FileNotFoundError:
            pass

    def _truncate(self, fd: int, upload_id: str, offset: int, marker: bool = True) -> None:
        os.ftruncate(fd, offset)
        if marker:
            self._remove_marker(upload_id)

    def _finish_files(self, fd: int, upload_id: str, digest: str) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.partial_path(upload_id), self.final_path(upload_id))
        for path in self._segment_files(upload_id):  # left by writers that died or lost
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        info_path = self.info_path(upload_id)
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
        info.update(sha256=digest, completed=time.time())
        with open(info_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(info_path + ".tmp", info_path)
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _delete_files(self, fd: int, upload_id: str) -> None:
        if fd >= 0:
            os.close(fd)
        for path in (
            self.partial_path(upload_id),
            self.info_path(upload_id),
            self._marker_path(upload_id),
            *self._segment_files(upload_id),
        ):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _hash_fd(self, fd: int, size: int) -> _Hasher:
        """The sha256 state of the first ``size`` bytes of ``fd`` (executor job)."""
        return self._hash_prefix(fd, size)[0]

    def _hash_prefix(self, fd: int, size: int) -> tuple[_Hasher, int]:
        """The sha256 state of up to ``size`` bytes of ``fd``, and how many it read."""
        hasher: _Hasher = hashlib.sha256()
        pos = 0
        while pos < size:
            block = os.pread(fd, min(self.chunk_size, size - pos), pos)
            if not block:
                break
            hasher.update(block)
            pos += len(block)
        return hasher, pos

    def _load_files(
        self,
        upload_id: str,
        repair: bool = True,
        limit: int | None = None,
        hash_now: bool = True,
    ) -> tuple[dict[str, Any], int, _Hasher | None, float] | None:
        part = self.partial_path(upload_id)
        try:
            with open(self.info_path(upload_id), encoding="utf-8") as fh:
                info = json.load(fh)
            if "sha256" in info and os.path.exists(self.final_path(upload_id)):
                info["_offset"] = int(info["size"] or 0)
                return info, -1, hashlib.sha256(), float(info.get("completed", 0.0))
            fd = os.open(part, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            marker = False
            try:
                with open(self._marker_path(upload_id), encoding="ascii") as fh:
                    size = min(int(fh.read().strip() or 0), size)
                marker = True
            except FileNotFoundError:
                pass
            declared = info["size"]
            if declared is not None:
                size = min(size, int(declared))
            if limit is not None:
                size = min(size, limit)
            if stat.st_size > size and repair:
                os.ftruncate(fd, size)
            if marker and repair:
                os.unlink(self._marker_path(upload_id))
            hasher: _Hasher | None = None
            pos = size
            if hash_now:
                hasher, pos = self._hash_prefix(fd, size)
        finally:
            # Writes reopen the file within the store's descriptor budget.
            os.close(fd)
        info["_offset"] = pos
        return info, 0, hasher, stat.st_mtime

    async def _load(
        self,
        upload_id: str,
        *,
        repair: bool = True,
        limit: int | None = None,
        hash_now: bool = True,
    ) -> ChunkedUploadSink:
        """Open an upload from its files; ``hash_now=False`` leaves the sha256 for
        :meth:`ChunkedUploadSink.finish` (a writer of another process may have appended:
        hashing the whole part on every change of process would cost O(n^2))."""
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(
                self.executor, self._load_files, upload_id, repair, limit, hash_now
            )
        except OSError as exc:
            raise _storage_error(exc) from exc
        if loaded is None:
            raise UploadError("no such upload", status=404)
        info, fd, hasher, mtime = loaded
        declared = info["size"]
        size = None if declared is None else int(declared)
        state = UploadState(
            size=size,
            max_size=max(size or 0, self.max_size, info["_offset"]),
            offset=info["_offset"],
            now=mtime,
        )
        metadata = {str(k): str(v) for k, v in dict(info.get("metadata", {})).items()}
        sink = ChunkedUploadSink(
            self, upload_id, state, metadata, float(info["created"]), -1, hasher
        )
        concat = info.get("concat")
        sink.concat = concat if concat in ("partial", "final") else None
        sink.parts = tuple(str(part) for part in info.get("parts", ()))
        if fd < 0:  # completed earlier: answer HEAD with offset == size
            state.status = UploadStatus.COMPLETE
            sink._final_sha256 = str(info["sha256"])
        elif hasher is not None:
            self._counters.rehashed += 1
        return sink

    def _scan_expired(self, cutoff: float) -> list[str]:
        found = []
        for entry in os.scandir(self.root):
            name = entry.name
            if name.endswith(".part") and is_upload_id(name[:-5]):
                try:
                    if entry.stat().st_mtime <= cutoff:
                        found.append(name[:-5])
                except FileNotFoundError:
                    pass
        return found

    # -- in-memory cache ------------------------------------------------------------

    def _remember(self, sink: ChunkedUploadSink) -> None:
        self._sinks[sink.id] = sink
        if len(self._sinks) <= self.max_cached:
            return
        for upload_id, other in list(self._sinks.items()):
            if len(self._sinks) <= self.max_cached:
                break
            if other is sink or other.locked or other._queue or other._buffer:
                continue
            if other._fd_users or other._fd_opening is not None:
                continue
            if other._writer is not None and not other._writer.done():
                continue
            other._close_fd()
            del self._sinks[upload_id]
            self._counters.evicted += 1

    def _forget(self, upload_id: str) -> None:
        sink = self._sinks.pop(upload_id, None)
        if sink is not None:
            sink._close_fd()

    # -- descriptor budget (max_open_files) -------------------------------------------

    def _touch_fd(self, sink: ChunkedUploadSink) -> None:
        self._open_fds.move_to_end(sink._fd_key)

    async def _reserve_fd(self) -> None:
        """Wait for room in the budget (closing idle descriptors), then hold one place."""
        waited = False
        while len(self._open_fds) + self._fd_reserved >= self.max_open_files:
            if self._close_idle_fd():
                continue
            if not waited:
                waited = True
                self._counters.file_waits += 1
            waiter = asyncio.get_running_loop().create_future()
            self._fd_waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._fd_waiters.remove(waiter)
        self._fd_reserved += 1

    def _unreserve_fd(self) -> None:
        self._fd_reserved -= 1
        self._wake_fd_waiter()

    def _fd_opened(self, sink: ChunkedUploadSink) -> None:
        self._fd_reserved -= 1
        self._open_fds[sink._fd_key] = sink

    def _fd_gone(self, sink: ChunkedUploadSink) -> None:
        if self._open_fds.get(sink._fd_key) is sink:
            del self._open_fds[sink._fd_key]
        self._wake_fd_waiter()

    def _close_idle_fd(self) -> bool:
        """Close the least recently used descriptor no job is using; False if none."""
        for sink in self._open_fds.values():
            if sink._fd_users == 0:
                fd, sink._fd = sink._fd, -1
                del self._open_fds[sink._fd_key]
                self._counters.files_closed += 1
                os.close(fd)
                return True
        return False

    def _wake_fd_waiter(self) -> None:
        while self._fd_waiters:
            waiter = self._fd_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
