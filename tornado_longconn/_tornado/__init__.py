"""The one door to Tornado's (and redis-py's) private names (internal).

Every read of a private attribute of Tornado or redis-py, every raw socket write
and every method patch the library needs lives in a submodule of this package,
typed with ``Protocol``\\ s and noted with the versions it was checked against:

* :mod:`._tornado._check` -- the version check: every submodule registers the
  names it reads; a missing one raises at import.
* :mod:`._tornado.iostream` -- ``IOStream`` write buffer and indexes, read
  buffer, close callback, raw socket sends and the ``SO_LINGER`` reset; and
  ``KeepReadingIOStream``, Tornado's ``_handle_events`` with one condition
  changed (keeps listening while a few bytes wait unread).
* :mod:`._tornado.fanout` -- the broadcast fan-out's per-member loop, with the
  stream reads and raw ``send()`` it inlines.
* :mod:`._tornado.websocket_proto` -- ``WebSocketProtocol13`` counters and the
  permessage-deflate compressor's parameters.
* :mod:`._tornado.web` -- ``RequestHandler._finished``.
* :mod:`._tornado.hooks` -- WebSocket close listeners behind two methods
  patched once on Tornado's classes (``WebSocketProtocol13.close``,
  ``WebSocketHandler.on_ws_connection_close``); one method patch per handler,
  many listeners, for the rest (close, finish, on_connection_close, the
  stream's close callback).
* :mod:`._tornado.http1` -- HTTP/1 connections: early answers to requests whose
  body is still arriving.
* :mod:`._tornado.server` -- the accept loop: surviving descriptor exhaustion.
* :mod:`._tornado.websocket` -- the WebSocket reader: RFC 6455 strictness.
* :mod:`._tornado.redispy` -- redis-py: the Redis backend's raw pub/sub
  connection (checked when the backend is imported).

A Tornado release that renames one of them fails loudly with
:class:`~tornado_longconn.exceptions.LongConnError` naming the attribute and the
installed version, and ``tests/test_tornado_canary.py`` fails first.
"""

from __future__ import annotations
