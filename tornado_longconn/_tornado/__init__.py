"""The one door to Tornado's (and redis-py's) private names (internal).

Every read of a private attribute of Tornado or redis-py, every raw socket write
and every method patch the library needs lives in a submodule of this package,
typed with ``Protocol``\\ s and noted with the versions it was checked against:

* :mod:`._tornado.http1` -- HTTP/1 connections: early answers to requests whose
  body is still arriving.
* :mod:`._tornado.server` -- the accept loop: surviving descriptor exhaustion.
* :mod:`._tornado.websocket` -- the WebSocket reader: RFC 6455 strictness.

A Tornado release that renames one of them fails loudly with
:class:`~tornado_longconn.exceptions.LongConnError` naming the attribute and the
installed version, and ``tests/test_tornado_canary.py`` fails first.
"""

from __future__ import annotations
