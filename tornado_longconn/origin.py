"""Origin policy: same-origin by default, an allow-list when pages live elsewhere.

Browsers attach a user's cookies to a WebSocket handshake from any site, and
to an ``EventSource`` or a ``GET`` from any page (the page cannot read the
answer, but the request still opens a stream, joins presence, holds a slot of
the connection caps). So every transport of the library refuses a browser
request from another origin unless that origin is allowed:

* WebSocket (:class:`~tornado_longconn.subscriptions.SubscriptionMixin`,
  :class:`~tornado_longconn.strict.StrictWebSocketMixin` and so
  :class:`~tornado_longconn.heartbeat.HeartbeatMixin`): ``check_origin``, so
  the handshake is answered 403 before the upgrade.
* SSE and long-poll (:class:`~tornado_longconn.sse.SSEMixin`,
  :class:`~tornado_longconn.longpoll.LongPollMixin`, the multi-topic
  ``SubscriptionSSEHandler`` / ``SubscriptionPollHandler``) and the HTTP
  publish (``SubscriptionPublishHandler``, including its CORS preflight):
  ``403 {"code":"forbidden","reason":"cross-origin request refused"}``.
  An allowed cross-origin request gets ``Access-Control-Allow-Origin`` (the
  exact origin), ``Access-Control-Allow-Credentials: true`` and ``Vary: Origin``.
* tus uploads: CORS headers only for the handler's ``cors_origins``
  (default: none), so a browser refuses a cross-origin upload at its preflight.

A request is same-origin when its ``Origin`` header names the host of its
``Host`` header (Tornado's rule for WebSocket); a request without ``Origin``
(a non-browser client, or a same-origin ``GET``) is allowed unless its
``Sec-Fetch-Site`` header says ``cross-site``. List other origins in the
handler attribute ``allowed_origins`` or the application setting
``longconn_allowed_origins`` (exact origins such as
``"https://app.example"``; ``"*"`` allows every origin: never with cookies).
Refusals are counted in ``subscription_stats(app).refused["origin"]`` (and the
``longconn_subscription_connections_refused`` metric).

>>> origin_allowed("https://app.example", "app.example", None)
True
>>> origin_allowed("https://evil.example", "app.example", None)
False
>>> origin_allowed("https://app.example", "api.example", {"https://app.example"})
True
>>> origin_allowed(None, "app.example", None), origin_allowed(None, "x", None, "cross-site")
(True, False)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final
from urllib.parse import urlsplit

import tornado.web

__all__ = [
    "ORIGIN_SETTING",
    "allowed_origins_of",
    "cors_headers",
    "count_refused",
    "origin_allowed",
    "refuse_cross_origin",
    "request_origin_allowed",
]

#: The application setting listing the origins allowed besides the server's own.
ORIGIN_SETTING: Final = "longconn_allowed_origins"


def origin_allowed(
    origin: str | None,
    host: str | None,
    allowed: Collection[str] | str | None,
    fetch_site: str | None = None,
) -> bool:
    """Whether a request from ``origin`` to ``host`` passes the policy (see the module docs).

    ``allowed`` -- extra origins (exact, e.g. ``"https://app.example"``), or
    ``"*"`` for any (another single string is not a list and allows nothing
    more); ``fetch_site`` -- the ``Sec-Fetch-Site`` header, used
    when there is no ``Origin``. Pure: no request object, no I/O.
    """
    if allowed == "*":
        return True
    if origin is None:
        return fetch_site != "cross-site"
    if allowed is not None and not isinstance(allowed, str) and origin in allowed:
        return True
    if origin == "null":  # sandboxed frames, file: pages, some redirects
        return False
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and host is not None and netloc == host.lower()


def allowed_origins_of(handler: tornado.web.RequestHandler) -> Collection[str] | str | None:
    """The handler's ``allowed_origins``, else the application setting, else None."""
    allowed: Collection[str] | str | None = getattr(handler, "allowed_origins", None)
    if allowed is None:
        allowed = handler.application.settings.get(ORIGIN_SETTING)
    return allowed


def request_origin_allowed(handler: tornado.web.RequestHandler, origin: str | None = None) -> bool:
    """Whether ``handler``'s request passes the origin policy (``origin``: its ``Origin``)."""
    headers = handler.request.headers
    if origin is None:
        origin = headers.get("Origin")
    return origin_allowed(
        origin,
        headers.get("Host"),
        allowed_origins_of(handler),
        headers.get("Sec-Fetch-Site"),
    )


def count_refused(application: tornado.web.Application) -> None:
    """Count one request refused by the origin policy (``subscription_stats().refused``)."""
    from .subscriptions import SubscriptionCounters

    SubscriptionCounters.for_application(application).refuse("origin")


def cors_headers(handler: tornado.web.RequestHandler) -> None:
    """Allow the browser to read the answer of an allowed cross-origin request (else nothing)."""
    origin = handler.request.headers.get("Origin")
    if origin is None or origin_allowed(origin, handler.request.headers.get("Host"), None):
        return  # no origin, or our own: no CORS needed
    handler.set_header("Access-Control-Allow-Origin", origin)
    handler.set_header("Access-Control-Allow-Credentials", "true")
    handler.add_header("Vary", "Origin")


def refuse_cross_origin(handler: tornado.web.RequestHandler) -> bool:
    """Answer 403 and return True when the request fails the origin policy.

    Otherwise set the CORS headers of an allowed cross-origin request (see
    :func:`cors_headers`) and return False: go on.
    """
    if request_origin_allowed(handler):
        cors_headers(handler)
        return False
    count_refused(handler.application)
    handler.clear()
    handler.set_status(403)
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.set_header("Cache-Control", "no-store")
    handler.set_header("Vary", "Origin")
    handler.finish('{"code":"forbidden","reason":"cross-origin request refused"}')
    return True
