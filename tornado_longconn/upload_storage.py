"""The storage interface of uploads: what the tus handler needs from a store.

:class:`~tornado_longconn.upload.UploadStore` (local disk, the default) satisfies
:class:`UploadStorage`, and its :class:`~tornado_longconn.upload.ChunkedUploadSink`
satisfies :class:`UploadHandle`. The tus handler calls nothing else, so a store for
another medium plugs into :class:`~tornado_longconn.upload_tus.TusUploadHandler`
unchanged: implement these two protocols (``isinstance(store, UploadStorage)`` checks
the names at run time; mypy checks the signatures).

The operations, and how an object store with multipart uploads (S3 and compatibles)
maps them:

* ``create`` -- disk: ``<id>.info`` and an empty ``<id>.part``. S3:
  ``CreateMultipartUpload``, the record (size, metadata, S3 upload id) in an
  ``<id>.info`` object.
* ``handle.write`` -- disk: ``pwrite`` at the offset, in the executor. S3: buffer to a
  part of at least 5 MiB (S3's minimum, except for the last part), ``UploadPart``.
* durable offset (``describe``, ``durable_offset``, HEAD) -- disk: the size of
  ``<id>.part``. S3: the sum of the completed parts plus the size of a *tail* object: a
  request that ends below 5 MiB of unsent part stores it as ``<id>.tail`` (a plain
  ``PutObject``), so every byte a client was told of is durable; the next write reads
  it back first.
* ``handle.finish`` -- disk: ``fsync``, rename, ``fsync`` of the directory. S3: the
  tail as the last part, then ``CompleteMultipartUpload``.
* ``handle.abort`` / ``handle.delete`` -- disk: unlink the files. S3:
  ``AbortMultipartUpload`` / ``DeleteObject``.
* ``read`` -- disk: read ``<id>``. S3: ``GetObject`` with ``Range``.
* ``concatenate`` -- disk: copy in the executor. S3: ``UploadPartCopy`` of each part
  (each at least 5 MiB but the last).

The offset/size/status bookkeeping is :class:`~tornado_longconn.upload.UploadState`
(I/O-free) whatever the medium: a handle exposes it as ``state``. Per-request
checksums (``begin_segment`` ... ``end_segment``) must be able to discard the bytes
of a failed segment: on S3, keep a segment in the tail (or in parts not yet listed
for completion) until it is verified.

Shared state (:mod:`tornado_longconn.upload_state`) is independent of the medium: a
store uses it to lock and record uploads so several processes serve them. A store may
also offer ``open_append(upload_id, offset)`` (the local-disk store does, with shared
state): a handle that writes the body without the lock, whose ``end_append()`` commits
it in one compare-and-set before the answer; the tus handler uses it for a PATCH with
a body when the store has it (else ``lock_for_write``). On S3 the segment is a part (or
the tail) not yet listed for completion, committed the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tornado_longconn.upload import (
    ChunkedUploadSink,
    UploadInfo,
    UploadState,
    UploadStats,
    UploadStore,
)

__all__ = ["UploadHandle", "UploadStorage"]


@runtime_checkable
class UploadHandle(Protocol):
    """One upload being received (:class:`~tornado_longconn.upload.ChunkedUploadSink`).

    Used from the event loop only. Errors are
    :class:`~tornado_longconn.exceptions.UploadError` with the HTTP status to answer.
    """

    #: The server-generated id.
    id: str
    #: The I/O-free offset/size/status state.
    state: UploadState
    #: Sanitized client metadata.
    metadata: dict[str, str]
    #: ``"partial"``, ``"final"`` or None.
    concat: str | None
    #: The ids a final upload was made of.
    parts: tuple[str, ...]

    @property
    def offset(self) -> int:
        """The durable offset."""
        ...

    @property
    def size(self) -> int:
        """The declared size (``max_size`` while deferred)."""
        ...

    @property
    def deferred(self) -> bool:
        """True while the length is not declared."""
        ...

    @property
    def in_segment(self) -> bool:
        """True inside a checksummed segment."""
        ...

    def write(self, data: bytes | memoryview) -> Awaitable[None]:
        """Queue the next bytes; the awaitable resolves when there is room for more."""
        ...

    async def flush(self) -> int:
        """Store every queued byte; return the durable offset."""
        ...

    async def begin_segment(self, algorithm: str, expected: bytes) -> None:
        """Start a segment whose bytes must hash to ``expected``."""
        ...

    async def end_segment(self) -> int:
        """Verify the segment (460 and rolled back on a mismatch); the durable offset."""
        ...

    async def rollback_segment(self) -> int:
        """Discard the open segment; the durable offset."""
        ...

    async def declare_length(self, size: int) -> None:
        """Declare a deferred length."""
        ...

    async def finish(self, *, expected_sha256: str | None = None) -> str:
        """Complete the upload atomically; return where the file is."""
        ...

    async def abort(self) -> None:
        """Terminate a partial upload."""
        ...

    async def delete(self) -> None:
        """Remove the upload whatever its status."""
        ...

    async def end_write(self) -> None:
        """Record the upload's state and let the writer lock go."""
        ...

    def release_later(self) -> None:
        """:meth:`end_write` from synchronous code."""
        ...

    def info(self) -> UploadInfo:
        """A snapshot of the upload (for hooks)."""
        ...


@runtime_checkable
class UploadStorage(Protocol):
    """A store of uploads (:class:`~tornado_longconn.upload.UploadStore`)."""

    #: Largest declared size (``Tus-Max-Size``).
    max_size: int
    #: Seconds an idle partial upload lives.
    expire_after: float

    async def create(
        self,
        size: int | None,
        *,
        metadata: Mapping[str, str] | None = None,
        now: float | None = None,
        concat: str | None = None,
        parts: Sequence[str] = (),
    ) -> UploadHandle:
        """Create an upload (``size`` None: deferred)."""
        ...

    async def describe(self, upload_id: str, *, now: float | None = None) -> UploadInfo:
        """What is known about an upload, without reading its bytes (HEAD)."""
        ...

    async def durable_offset(self, upload_id: str) -> int:
        """The bytes of the upload that are stored for good."""
        ...

    async def lock_for_write(self, upload_id: str, *, now: float | None = None) -> UploadHandle:
        """Open the upload and hold it for one writer (423 if held)."""
        ...

    async def check_partials(self, part_ids: Sequence[str], *, now: float | None = None) -> int:
        """Check that the partial uploads can be concatenated; their total size."""
        ...

    async def concatenate(
        self,
        part_ids: Sequence[str],
        *,
        metadata: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> UploadHandle:
        """A completed upload made of completed partial uploads."""
        ...

    async def read(self, upload_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a completed upload."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run clean-up that outlives a request."""
        ...

    def count_refused(self, status: int) -> None:
        """Count an error answer."""
        ...

    def count_hook(self, *, rejected: bool) -> None:
        """Count a hook that rejected an upload (``rejected``) or failed."""
        ...

    def stats(self) -> UploadStats:
        """The counters."""
        ...


def _local_disk_conforms(
    store: UploadStore, sink: ChunkedUploadSink
) -> tuple[UploadStorage, UploadHandle]:
    """Never called: mypy checks here that the local-disk store keeps the protocols."""
    return store, sink
