"""Upload quotas per user, as I/O-free rule objects: bytes in flight and total bytes.

:class:`UploadQuota` is the rule (the limits); :class:`UploadQuotaLedger` applies it to
users: it counts, per key (a user), the bytes of request bodies being received now
(*in flight*) and the declared sizes of the uploads the key created (*total*), and
answers each new request. It reads no clock and does no I/O, so it is tested without
an event loop. The tus handler (``quotas=`` of
:class:`~tornado_longconn.upload_tus.TusUploadHandler`) and the WebSocket upload
protocol (:attr:`~tornado_longconn.upload_ws.WebSocketUploadMixin.upload_quotas`)
apply it; the key is the handler's ``current_user`` (see ``upload_quota_key``).

The answers (an :class:`UploadQuotaExceeded`, an
:class:`~tornado_longconn.exceptions.UploadError`):

* **413** -- an upload whose declared length would bring the key's total past
  ``max_total``, or a single request body larger than ``max_in_flight`` (it can never
  fit). Nothing is created or read.
* **429** with ``Retry-After`` -- a body that would bring the key's bytes in flight
  past ``max_in_flight`` while its other requests are still being received. The
  client retries after a HEAD (tus clients do); nothing was read.

The ledger is **per process**: behind a load balancer each process counts the
requests it receives, so a user may have up to N times ``max_in_flight`` in flight over N
processes, and the total counts the uploads created (or whose length was declared)
through this process since it started; a DELETE through this process gives their bytes
back. Use sticky routing by user, or divide the limits by the number of processes, if
that matters.

>>> ledger = UploadQuotaLedger(UploadQuota(max_in_flight=100, max_total=1000))
>>> ledger.add_total("ann", "u1", 600)
>>> ledger.add_total("ann", "u2", 600)
Traceback (most recent call last):
...
tornado_longconn.upload_quota.UploadQuotaExceeded: upload quota: 1200 bytes in total, at most 1000
>>> ticket = ledger.begin("ann", 80)
>>> ledger.begin("ann", 40).status
Traceback (most recent call last):
...
tornado_longconn.upload_quota.UploadQuotaExceeded: upload quota: 120 bytes in flight, at most 100
>>> ledger.end(ticket)
>>> ledger.usage("ann")
QuotaUsage(in_flight=0, total=600)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tornado_longconn.exceptions import UploadError

__all__ = [
    "QuotaTicket",
    "QuotaUsage",
    "UploadQuota",
    "UploadQuotaExceeded",
    "UploadQuotaLedger",
]

#: Keys (users) whose uploads are tracked at most; past it the least recently
#: created upload's bytes are no longer tracked (a bounded table, never unbounded).
_MAX_UPLOADS: Final = 1_000_000


class UploadQuotaExceeded(UploadError):
    """A request over an upload quota: status 413 (never fits) or 429 (retry later).

    ``reason`` is ``"quota"`` (the handlers count it in ``stats().quota_refusals``).
    """

    reason = "quota"


@dataclass(frozen=True, slots=True)
class UploadQuota:
    """The limits of one user's uploads (None: no limit).

    * ``max_in_flight`` -- bytes of request bodies of one key being received at once
      (a tus PATCH or creation-with-upload body counts its ``Content-Length``, or what
      remains of the upload for a chunked body; a WebSocket upload its window,
      ``upload_window * upload_chunk_size``, while a connection holds it).
    * ``max_total`` -- bytes of all uploads of one key (their declared lengths; a
      deferred length counts once declared; a final concatenation is not counted again,
      its parts were).
    * ``retry_after`` [1 s] -- the ``Retry-After`` of a 429.

    Raises ``ValueError`` for a negative limit or a ``retry_after`` that is not positive.
    """

    max_in_flight: int | None = None
    max_total: int | None = None
    retry_after: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_total"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if not self.retry_after > 0:
            raise ValueError("retry_after must be positive")


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """One key's usage now: bytes in flight and total bytes."""

    in_flight: int
    total: int


@dataclass(slots=True)
class QuotaTicket:
    """Bytes in flight granted to ``key`` by :meth:`UploadQuotaLedger.begin`; give it back."""

    key: str
    nbytes: int
    open: bool = True


class UploadQuotaLedger:
    """Applies an :class:`UploadQuota` to keys (users); see the module documentation.

    One ledger per application (per process). Every method is synchronous and I/O-free.
    """

    __slots__ = ("_in_flight", "_totals", "_uploads", "quota")

    def __init__(self, quota: UploadQuota) -> None:
        self.quota = quota
        self._in_flight: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        # upload id -> (key, bytes counted in its key's total)
        self._uploads: dict[str, tuple[str, int]] = {}

    def usage(self, key: str) -> QuotaUsage:
        """``key``'s bytes in flight and total now."""
        return QuotaUsage(self._in_flight.get(key, 0), self._totals.get(key, 0))

    def check_total(self, key: str, size: int) -> None:
        """Raise 413 if ``size`` more bytes would bring ``key`` past ``max_total``."""
        limit = self.quota.max_total
        total = self._totals.get(key, 0) + size
        if limit is not None and total > limit:
            raise UploadQuotaExceeded(
                f"upload quota: {total} bytes in total, at most {limit}", status=413
            )

    def add_total(self, key: str, upload_id: str, size: int) -> None:
        """Count upload ``upload_id`` of ``size`` bytes in ``key``'s total (413 past it).

        Adding to an upload already counted (a deferred length declared later) adds
        ``size`` to it.
        """
        self.check_total(key, size)
        self._totals[key] = self._totals.get(key, 0) + size
        held = self._uploads.pop(upload_id, None)
        counted = size if held is None else held[1] + size
        self._uploads[upload_id] = (key, counted)
        if len(self._uploads) > _MAX_UPLOADS:
            oldest = next(iter(self._uploads))
            del self._uploads[oldest]  # its bytes stay counted; it can no longer be given back

    def rename(self, old: str, new: str) -> None:
        """Count what ``old`` holds (a reservation made before the id was known) as ``new``."""
        held = self._uploads.pop(old, None)
        if held is not None:
            self._uploads[new] = held

    def remove(self, upload_id: str) -> None:
        """The upload is gone (terminated, expired): its bytes leave its key's total."""
        held = self._uploads.pop(upload_id, None)
        if held is None:
            return
        key, size = held
        left = self._totals.get(key, 0) - size
        if left > 0:
            self._totals[key] = left
        else:
            self._totals.pop(key, None)

    def begin(self, key: str, nbytes: int) -> QuotaTicket:
        """Grant ``nbytes`` in flight to ``key``; raise 413 or 429 (see the module).

        Give the ticket back with :meth:`end` when the body ended (stored, failed or cut).
        """
        limit = self.quota.max_in_flight
        if limit is not None:
            if nbytes > limit:
                raise UploadQuotaExceeded(
                    f"upload quota: a body of {nbytes} bytes, at most {limit} in flight",
                    status=413,
                )
            now = self._in_flight.get(key, 0) + nbytes
            if now > limit:
                raise UploadQuotaExceeded(
                    f"upload quota: {now} bytes in flight, at most {limit}",
                    status=429,
                    retry_after=self.quota.retry_after,
                )
        self._in_flight[key] = self._in_flight.get(key, 0) + nbytes
        return QuotaTicket(key, nbytes)

    def end(self, ticket: QuotaTicket) -> None:
        """Give back a ticket's bytes in flight (idempotent)."""
        if not ticket.open:
            return
        ticket.open = False
        left = self._in_flight.get(ticket.key, 0) - ticket.nbytes
        if left > 0:
            self._in_flight[ticket.key] = left
        else:
            self._in_flight.pop(ticket.key, None)
