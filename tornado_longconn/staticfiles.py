"""The JavaScript client shipped inside the package, and how to serve it.

``longconn.js`` is a small, dependency-free browser client for the handlers of
this library: WebSocket with automatic fallback to Server-Sent Events and then
long-poll, reconnect with full-jitter backoff, resume from the last cursor
(``LongConn.connect()``, one stream) or many topics on one connection each
resumed from its own cursor (``LongConn.session()``, the subscriptions protocol),
replies to application-level heartbeats, and an upload helper (tus 1.0 or the
WebSocket chunk protocol). It lives in the package's ``static/`` directory, so
an installed wheel carries it; serve it with Tornado's own
:class:`~tornado.web.StaticFileHandler`::

    from tornado_longconn.staticfiles import static_path, static_url_spec

    app = tornado.web.Application([
        static_url_spec(),                # GET /longconn/longconn.js
        ...
    ])

or copy it next to your own static files (``static_path("longconn.js")``).
Its TypeScript declarations are shipped next to it (``static_path("longconn.d.ts")``);
the repository's ``package.json`` makes the same two files an npm package.
"""

from __future__ import annotations

import os
import re
from typing import Any

import tornado.web

__all__ = ["static_path", "static_url_spec"]

_STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def static_path(name: str | None = None) -> str:
    """The absolute path of the package's static directory, or of one file in it.

    ``name`` (default ``None``) is a file name inside the directory, e.g.
    ``"longconn.js"``; ``None`` returns the directory itself. Raises
    :class:`FileNotFoundError` when ``name`` is not a shipped file, and
    :class:`ValueError` when it is not a plain file name (no directories).
    """
    if name is None:
        return _STATIC_DIR
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"expected a plain file name inside the static directory, got {name!r}")
    path = os.path.join(_STATIC_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return path


def static_url_spec(
    prefix: str = "/longconn/",
) -> tuple[str, type[tornado.web.StaticFileHandler], dict[str, Any]]:
    """A Tornado URL rule serving the shipped files under ``prefix``.

    ``prefix`` (default ``"/longconn/"``) must start and end with ``/``; the
    client is then at ``<prefix>longconn.js``. Add the returned tuple to your
    ``Application``'s rules. Raises :class:`ValueError` for a malformed prefix.
    """
    if not (prefix.startswith("/") and prefix.endswith("/")):
        raise ValueError(f"prefix must start and end with '/', got {prefix!r}")
    return (re.escape(prefix) + r"(.*)", tornado.web.StaticFileHandler, {"path": _STATIC_DIR})
