"""Tornado's ``RequestHandler``: the private names the library reads (internal).

Private names used (checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``RequestHandler._finished`` -- True once ``finish()`` ran (the response is
  complete; nothing more may be written).
* ``RequestHandler._current_user`` -- where the ``current_user`` property caches
  the user once something asked for it (read by :func:`known_current_user`, for
  log fields, so logging never calls ``get_current_user``).

Checked once when this module is imported (:func:`check_web`).
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import tornado.web

from ._check import missing, register, require_attrs, require_init_attrs

__all__ = ["HandlerInternals", "check_web", "finished", "known_current_user"]


class HandlerInternals(Protocol):
    """The private part of ``tornado.web.RequestHandler`` that the library reads."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _finished: bool


def check_web() -> None:
    """Raise :class:`~tornado_longconn.exceptions.LongConnError` if a name above is gone."""
    require_init_attrs(tornado.web.RequestHandler, ("_finished",))
    require_attrs(tornado.web.RequestHandler, ("finish", "flush", "write", "on_connection_close"))
    prop = tornado.web.RequestHandler.__dict__.get("current_user")
    getter = getattr(prop, "fget", None)
    if "_current_user" not in getattr(getattr(getter, "__code__", None), "co_names", ()):
        raise missing(
            "tornado.web.RequestHandler", "_current_user", "no longer cached by current_user"
        )


register(check_web)


def finished(handler: tornado.web.RequestHandler) -> bool:
    """True once ``handler.finish()`` ran."""
    return bool(cast(HandlerInternals, handler)._finished)


def known_current_user(handler: tornado.web.RequestHandler) -> Any:
    """The user ``handler.current_user`` returned or was set to; ``None`` if never asked.

    Never calls ``get_current_user`` (a log line must not authenticate).
    """
    return vars(handler).get("_current_user")
