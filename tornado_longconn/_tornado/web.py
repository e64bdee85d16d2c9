"""Tornado's ``RequestHandler``: the private names the library reads (internal).

Private names used (checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``RequestHandler._finished`` -- True once ``finish()`` ran (the response is
  complete; nothing more may be written).

Checked once when this module is imported (:func:`check_web`).
"""

from __future__ import annotations

from typing import Protocol, cast

import tornado.web

from ._check import register, require_attrs, require_init_attrs

__all__ = ["HandlerInternals", "check_web", "finished"]


class HandlerInternals(Protocol):
    """The private part of ``tornado.web.RequestHandler`` that the library reads."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _finished: bool


def check_web() -> None:
    """Raise :class:`~tornado_longconn.exceptions.LongConnError` if a name above is gone."""
    require_init_attrs(tornado.web.RequestHandler, ("_finished",))
    require_attrs(tornado.web.RequestHandler, ("finish", "flush", "write", "on_connection_close"))


register(check_web)


def finished(handler: tornado.web.RequestHandler) -> bool:
    """True once ``handler.finish()`` ran."""
    return bool(cast(HandlerInternals, handler)._finished)
