"""Connection expiry and token refresh: the I/O-free rule and what a hook returns.

An identity often comes with an end: a signed token's ``exp``, a session's
lifetime. :class:`SessionExpiry` is the rule a connection follows (it takes
``now`` and never reads a clock, like
:class:`~tornado_longconn.heartbeat.HeartbeatState`): a deadline for the first
authentication of a connection that opened anonymously, then the identity's
expiry, moved by each successful refresh. When the deadline passes the
connection ends: a WebSocket of
:class:`~tornado_longconn.subscriptions.SubscriptionMixin` is closed with 4401
(``CloseCode.UNAUTHORIZED``, reason ``"expired"`` or ``"authentication
timeout"``).

A hook returns :class:`Credentials` (the user and the expiry, seconds since the
epoch as in a JWT's ``exp``; None: never).

>>> rule = SessionExpiry(auth_deadline=10.0)
>>> rule.next_deadline(), rule.expired(9.0), rule.expired(10.0), rule.reason
(10.0, False, True, 'authentication timeout')
>>> rule.renew(100.0, now=5.0)
>>> rule.next_deadline(), rule.reason, rule.remaining(40.0)
(100.0, 'expired', 60.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_TOKEN_LENGTH", "Credentials", "ExpiredError", "SessionExpiry"]

#: Longest token the ``auth`` / ``refresh`` requests accept (characters).
MAX_TOKEN_LENGTH: Final = 8192


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a token says the client is, and until when.

    ``user`` -- the identity (becomes ``current_user``); ``expires_at`` --
    seconds since the epoch (``time.time()`` clock, e.g. a JWT's ``exp``) after
    which the connection is closed unless refreshed; None: it does not expire.
    """

    user: str
    expires_at: float | None = None


class ExpiredError(ValueError):
    """A renewal whose expiry is not in the future (:meth:`SessionExpiry.renew`)."""


class SessionExpiry:
    """When a connection's identity ends (see the module docs); I/O-free.

    ``expires_at`` -- the identity's expiry (None: none, or not known yet);
    ``auth_deadline`` -- by when an anonymous connection must authenticate
    (None: no such deadline). Times are on one clock, the caller's ``now``.
    """

    __slots__ = ("auth_deadline", "expires_at", "renewals")

    def __init__(self, expires_at: float | None = None, auth_deadline: float | None = None) -> None:
        self.expires_at = expires_at
        self.auth_deadline = auth_deadline
        #: Successful renewals so far.
        self.renewals = 0

    def next_deadline(self) -> float | None:
        """When the connection must end unless renewed (None: never)."""
        if self.auth_deadline is not None:
            if self.expires_at is None:
                return self.auth_deadline
            return min(self.auth_deadline, self.expires_at)
        return self.expires_at

    @property
    def reason(self) -> str:
        """The close reason when :meth:`expired`: ``"authentication timeout"`` or ``"expired"``."""
        return "authentication timeout" if self.auth_deadline is not None else "expired"

    def expired(self, now: float) -> bool:
        """True when the deadline passed at ``now`` (close the connection)."""
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    def remaining(self, now: float) -> float | None:
        """Seconds from ``now`` to the deadline (never negative; None: no deadline)."""
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - now)

    def renew(self, expires_at: float | None, *, now: float) -> None:
        """Accept a (re)authentication valid until ``expires_at`` (None: no expiry).

        Clears the authentication deadline. Raises :class:`ExpiredError` (and
        changes nothing) when ``expires_at`` is not after ``now``.
        """
        if expires_at is not None and not expires_at > now:
            raise ExpiredError("the credentials have already expired")
        self.expires_at = expires_at
        self.auth_deadline = None
        self.renewals += 1
