"""Tornado's accept loop: the private names :mod:`tornado_longconn.server` needs (internal).

:class:`tornado.tcpserver.TCPServer` installs its accept handler with
:func:`tornado.netutil.add_accept_handler`, which lets every ``OSError`` of
``accept()`` other than ``EAGAIN``/``ECONNABORTED`` escape into the event loop.
At the descriptor limit (``EMFILE``) the listening socket stays readable, so the
loop calls the handler again at once and logs a traceback per call. To install
an accept handler of our own, a server must register its sockets where
:meth:`TCPServer.stop` finds them and hand accepted connections to
:meth:`TCPServer._handle_connection` (which wraps them in an ``IOStream``, with
TLS when configured, and calls ``handle_stream``).

Private names used (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``TCPServer._sockets`` -- ``dict[int, socket.socket]``: listening sockets by
  descriptor; :meth:`TCPServer.stop` closes them.
* ``TCPServer._handlers`` -- ``dict[int, Callable[[], None]]``: per descriptor,
  the function that removes the accept handler; :meth:`TCPServer.stop` calls it.
* ``TCPServer._handle_connection(connection, address)`` -- takes one accepted
  socket over (TLS wrap, ``IOStream``, ``handle_stream``).

A Tornado release without them raises
:class:`~tornado_longconn.exceptions.LongConnError` naming the attribute and
``tornado.version`` when this module is imported (:func:`check_server`,
registered with :func:`._check.check_tornado`) and again when a server is
created (never a silent fallback to Tornado's own loop).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol, cast

import tornado.tcpserver

from ..exceptions import LongConnError
from ._check import missing, register, require_attrs, require_init_attrs

__all__ = [
    "TCPServerInternals",
    "check_server",
    "check_tcpserver",
    "handle_connection",
    "register_listener",
]


class TCPServerInternals(Protocol):
    """The private part of :class:`tornado.tcpserver.TCPServer` that we use."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _sockets: dict[int, socket.socket]
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _handlers: dict[int, Callable[[], None]]

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _handle_connection(self, connection: socket.socket, address: Any) -> None: ...


def check_server() -> None:
    """Raise ``LongConnError`` unless ``TCPServer`` has the names above (run at import)."""
    require_attrs(tornado.tcpserver.TCPServer, ("_handle_connection",))
    require_init_attrs(tornado.tcpserver.TCPServer, ("_sockets", "_handlers"))


register(check_server)


def _missing(name: str) -> LongConnError:
    return missing(
        "tornado.tcpserver.TCPServer",
        name,
        "tornado_longconn.server cannot install its accept loop",
    )


def check_tcpserver(server: tornado.tcpserver.TCPServer) -> TCPServerInternals:
    """``server`` as :class:`TCPServerInternals`; raises ``LongConnError`` if a name is missing.

    Call it once, after ``TCPServer.__init__`` ran (the dictionaries are
    instance attributes).
    """
    for name in ("_sockets", "_handlers"):
        if not isinstance(getattr(server, name, None), dict):
            raise _missing(name)
    if not callable(getattr(server, "_handle_connection", None)):
        raise _missing("_handle_connection")
    return cast(TCPServerInternals, server)


def register_listener(
    server: TCPServerInternals, sock: socket.socket, remove: Callable[[], None]
) -> None:
    """Register ``sock`` and its accept handler's ``remove`` where ``TCPServer.stop`` finds them."""
    server._sockets[sock.fileno()] = sock
    server._handlers[sock.fileno()] = remove


def handle_connection(server: TCPServerInternals, connection: socket.socket, address: Any) -> None:
    """Hand an accepted ``connection`` to the server, as Tornado's own accept loop does."""
    server._handle_connection(connection, address)
