"""Answers that reach the client while its request body is still arriving.

A handler decorated with :func:`tornado.web.stream_request_body` often knows the
answer before the body arrived: the upload is locked (423), the offset is wrong
(409), the body is too large (413), the client is not allowed (401/403). Tornado
then writes the response and closes the socket at once, with body bytes unread;
the kernel turns that into a TCP reset and a client still sending never reads the
status (it sees ``ECONNRESET`` or a broken pipe instead).

:class:`EarlyAnswerMixin` (or :meth:`EarlyAnswer.arm` for a handler of your own
making) changes that, for every response a streaming handler finishes before its
body was read to the end:

* the response carries ``Connection: close`` (keep-alive is never offered on a
  connection whose body was not consumed);
* after the response is written the server ends its side of the connection (the
  client reads the status and an end of stream) and goes on reading and
  discarding the body, up to :attr:`EarlyAnswer.max_bytes` bytes
  (default :data:`DEFAULT_MAX_BYTES`, 8 MiB) or for
  :attr:`EarlyAnswer.timeout` seconds (default :data:`DEFAULT_TIMEOUT`, 5 s),
  whichever comes first, then closes. A client that reads the answer and closes
  ends it at once.

A client whose body is longer than the bound still gets a reset once the bound is
reached: raise ``max_bytes`` if your clients send large bodies and only read the
answer at the end (most HTTP libraries do), lower it to spend less on refused
uploads. Counters: :meth:`EarlyAnswer.stats`.

Example::

    @tornado.web.stream_request_body
    class Upload(EarlyAnswerMixin, tornado.web.RequestHandler):
        def initialize(self, early_answer: EarlyAnswer) -> None:
            self.early_answer = early_answer      # optional: shared policy + stats

        async def prepare(self) -> None:
            if not self.current_user:
                raise tornado.web.HTTPError(401)  # delivered, not a reset
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tornado.web
from tornado.concurrent import Future

from ._tornado.http1 import linger_after_answer
from .stats import COUNTER

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "EarlyAnswer",
    "EarlyAnswerMixin",
    "EarlyAnswerStats",
    "default_early_answer",
]

#: Body bytes read and discarded after an early answer before the connection closes.
#: 8 MiB: at 100 Mbit/s under a second of reading; a client that sends up to 8 MiB
#: before it reads the answer gets the status.
DEFAULT_MAX_BYTES = 8 << 20
#: Seconds after an early answer before the connection closes, body read or not
#: (nginx's ``lingering_timeout`` is 5 s too).
DEFAULT_TIMEOUT = 5.0

_SETTING = "longconn_early_answer"


@dataclass(frozen=True, slots=True)
class EarlyAnswerStats:
    """A snapshot of an :class:`EarlyAnswer` policy's counters (see :meth:`EarlyAnswer.stats`).

    All counters, since the policy was created.
    """

    #: Responses finished before the request body was read to its end.
    answered: int = field(default=0, metadata=COUNTER)
    #: Connections closed because ``max_bytes`` of body were discarded.
    closed_at_bytes: int = field(default=0, metadata=COUNTER)
    #: Connections closed because ``timeout`` passed after the answer.
    closed_at_deadline: int = field(default=0, metadata=COUNTER)
    #: Body bytes discarded on the connections closed at a bound.
    bytes_discarded: int = field(default=0, metadata=COUNTER)


class EarlyAnswer:
    """How long a connection keeps reading a body after an early answer, and counters.

    ``max_bytes`` [:data:`DEFAULT_MAX_BYTES`] -- body bytes read and discarded
    after the answer (0: close as soon as the answer is written); ``timeout``
    [:data:`DEFAULT_TIMEOUT`] -- seconds after the answer before the connection
    closes anyway. Raises ``ValueError`` for a negative ``max_bytes`` or a
    ``timeout`` that is not positive. One policy may be shared by many handlers
    (pass it through ``initialize`` or the application setting
    ``"longconn_early_answer"``); its :meth:`stats` count for all of them.
    """

    __slots__ = (
        "_answered",
        "_bytes_discarded",
        "_closed_at_bytes",
        "_closed_at_deadline",
        "max_bytes",
        "timeout",
    )

    def __init__(
        self, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._answered = 0
        self._closed_at_bytes = 0
        self._closed_at_deadline = 0
        self._bytes_discarded = 0

    def stats(self) -> EarlyAnswerStats:
        """A snapshot of the counters (:class:`EarlyAnswerStats`)."""
        return EarlyAnswerStats(
            answered=self._answered,
            closed_at_bytes=self._closed_at_bytes,
            closed_at_deadline=self._closed_at_deadline,
            bytes_discarded=self._bytes_discarded,
        )

    def arm(self, request: Any) -> bool:
        """Prepare ``request``'s connection to deliver an answer sent before its body ended.

        Call before the response headers are written. Returns True if the body is
        still arriving (the answer then goes out with ``Connection: close`` and the
        rest of the body is drained under this policy's bounds), False if there is
        nothing to do (body fully read, not an HTTP/1 server connection, or the
        client is gone). Calling it again for the same request is harmless.
        """
        armed = linger_after_answer(
            getattr(request, "connection", None),
            max_bytes=self.max_bytes,
            timeout=self.timeout,
            on_end=self._ended,
        )
        if armed and not getattr(request, "_longconn_answered_early", False):
            request._longconn_answered_early = True
            self._answered += 1
        return armed

    def _ended(self, reason: str, discarded: int) -> None:
        if reason == "bytes":
            self._closed_at_bytes += 1
        else:
            self._closed_at_deadline += 1
        self._bytes_discarded += discarded


def default_early_answer(application: tornado.web.Application) -> EarlyAnswer:
    """The application's policy: the setting ``"longconn_early_answer"``, made on first use."""
    policy = application.settings.get(_SETTING)
    if not isinstance(policy, EarlyAnswer):
        policy = EarlyAnswer()
        application.settings[_SETTING] = policy
    return policy


class EarlyAnswerMixin(tornado.web.RequestHandler):
    """Deliver every response a streaming handler finishes before its body was read.

    Put it before ``RequestHandler`` (or a subclass) in the bases of a handler
    decorated with :func:`tornado.web.stream_request_body`. Any ``finish()`` --
    yours, ``send_error``'s, an ``HTTPError`` raised in ``prepare`` or
    ``data_received`` -- that happens while the body is still arriving goes out with
    ``Connection: close`` and the rest of the body is drained as described in
    :mod:`tornado_longconn.streaming`. Set ``self.early_answer`` (an
    :class:`EarlyAnswer`) to choose the bounds; by default the application's
    (setting ``"longconn_early_answer"``, else one made with the defaults).

    After an early answer Tornado stops calling ``data_received``; the handler's
    ``post``/``put``/``patch`` method is not called.
    """

    early_answer: EarlyAnswer | None = None

    def answer_early(self) -> bool:
        """Arm the connection for an answer sent now, before the body ended.

        :meth:`finish` calls it; call it yourself before a ``flush()`` that sends
        headers while the body still arrives. Returns what :meth:`EarlyAnswer.arm`
        returns.
        """
        policy = self.early_answer
        if policy is None:
            policy = default_early_answer(self.application)
        return policy.arm(self.request)

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        """Finish the response; if the body is still arriving, deliver it (see the class)."""
        self.answer_early()
        return super().finish(chunk)
