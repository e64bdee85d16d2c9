"""One hook registry per handler: one patch per method, many listeners (internal).

Parts of the library need to run code when a handler closes: the writer flushes
its cork before ``close()`` / ``finish()`` and stops direct socket writes as soon
as ``ws_connection.close()`` runs; a broadcast member leaves its groups from
``on_connection_close`` (and from the stream's close callback, for an ``open()``
that raised after joining). Each of those methods is patched on the instance
ONCE, by :class:`HandlerHooks`, which calls every listener registered for it
and then the original method.

Method patches made here (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``RequestHandler.on_connection_close`` / ``close`` / ``finish`` -- instance
  attributes shadowing the class methods; an attribute someone else set first
  is kept and called as the original.
* ``WebSocketProtocol13.close`` -- Tornado calls it after every change that
  ends the data phase (close frame sent or received, abort).
* ``IOStream._close_callback`` -- read (through :mod:`.iostream`) to chain the
  callback that was set before ours.

The registry holds the handler and the protocol weakly, and listeners that are
bound methods through :class:`weakref.WeakMethod`, so hooking a handler creates
no reference cycle. Once ``on_connection_close`` ran, every patch is removed
(the attributes that were there before are put back).
"""

from __future__ import annotations

import enum
import logging
import weakref
from collections.abc import Callable
from types import MethodType
from typing import Any, Final

import tornado.web

from . import iostream

__all__ = ["HandlerHooks", "Hook"]

log = logging.getLogger("tornado_longconn.hooks")

_ATTR: Final = "_longconn_hooks"

Listener = Callable[[], object]


class Hook(enum.Enum):
    """A moment in a handler's close that listeners can run at."""

    #: ``handler.close()`` was called (listeners run before it).
    CLOSE = "close"
    #: ``handler.finish()`` was called (listeners run before it).
    FINISH = "finish"
    #: ``handler.on_connection_close()`` (listeners run before the original).
    CONNECTION_CLOSE = "on_connection_close"
    #: After ``on_connection_close`` and its listeners; then every patch is removed.
    AFTER_CONNECTION_CLOSE = "after_connection_close"
    #: ``handler.ws_connection.close()`` (listeners run before it).
    PROTOCOL_CLOSE = "protocol_close"
    #: The connection's ``IOStream`` closed (listeners run before the callback set earlier).
    STREAM_CLOSE = "stream_close"


_HANDLER_METHODS: Final = {
    Hook.CLOSE: "close",
    Hook.FINISH: "finish",
    Hook.CONNECTION_CLOSE: "on_connection_close",
}


def _strong(listener: Listener) -> Callable[[], Listener | None]:
    def get() -> Listener:
        return listener

    return get


def _ref(listener: Listener) -> Callable[[], Listener | None]:
    if isinstance(listener, MethodType):
        return weakref.WeakMethod(listener)
    return _strong(listener)


class HandlerHooks:
    """The hook registry of one handler; get it with :meth:`of`.

    :meth:`add` registers a listener (a callable without arguments) for a
    :class:`Hook`; the method behind it is patched on first use. A listener that
    raises is logged and the next one still runs, then the original method.
    """

    __slots__ = ("__weakref__", "_handler", "_listeners", "_patches", "_released")

    def __init__(self, handler: tornado.web.RequestHandler) -> None:
        self._handler = weakref.ref(handler)
        self._listeners: dict[Hook, list[Callable[[], Listener | None]]] = {}
        # (object ref, attribute name, our patch, what was in the instance __dict__ before)
        self._patches: list[tuple[weakref.ref[Any], str, object, object]] = []
        self._released = False

    @classmethod
    def of(cls, handler: tornado.web.RequestHandler) -> HandlerHooks:
        """The registry of ``handler``, created on first use."""
        hooks: HandlerHooks | None = handler.__dict__.get(_ATTR)
        if hooks is None or hooks._released:
            hooks = handler.__dict__[_ATTR] = cls(handler)
        return hooks

    @staticmethod
    def find(handler: tornado.web.RequestHandler) -> HandlerHooks | None:
        """The registry of ``handler`` if it has one (never creates it)."""
        hooks: HandlerHooks | None = handler.__dict__.get(_ATTR)
        return hooks

    def add(self, hook: Hook, listener: Listener) -> None:
        """Run ``listener()`` at ``hook``; patches the method behind it the first time.

        Raises :class:`ValueError` for ``PROTOCOL_CLOSE``/``STREAM_CLOSE`` on a
        handler without a WebSocket connection or stream.
        """
        listeners = self._listeners.get(hook)
        if listeners is None:
            listeners = self._listeners[hook] = []
            self._patch(hook)
        listeners.append(_ref(listener))

    def discard(self, hook: Hook, listener: Listener) -> None:
        """Stop calling ``listener`` at ``hook`` (the patch stays; nothing if absent)."""
        listeners = self._listeners.get(hook)
        if listeners:
            listeners[:] = [ref for ref in listeners if ref() not in (None, listener)]

    def run(self, hook: Hook) -> None:
        """Call the listeners of ``hook`` (each failure logged, never raised)."""
        listeners = self._listeners.get(hook)
        if not listeners:
            return
        for ref in list(listeners):
            listener = ref()
            if listener is None:
                continue
            try:
                listener()
            except Exception:
                log.exception("%s listener %r failed", hook.value, listener)

    def release(self) -> None:
        """Remove every patch (putting back what was there) and every listener."""
        self._released = True
        self._listeners.clear()
        patches, self._patches = self._patches, []
        for obj_ref, name, patch, before in patches:
            obj = obj_ref()
            if obj is None:
                continue
            if name == "_close_callback":
                if iostream.close_callback(obj) is patch:
                    obj.set_close_callback(before)
                continue
            attrs = obj.__dict__
            if attrs.get(name) is patch:
                if before is None:
                    del attrs[name]
                else:
                    attrs[name] = before
        handler = self._handler()
        if handler is not None and handler.__dict__.get(_ATTR) is self:
            del handler.__dict__[_ATTR]

    # -- patches ---------------------------------------------------------------

    def _patch(self, hook: Hook) -> None:
        handler = self._handler()
        if handler is None:
            return
        if hook is Hook.AFTER_CONNECTION_CLOSE:
            if Hook.CONNECTION_CLOSE not in self._listeners:
                self._listeners[Hook.CONNECTION_CLOSE] = []
                self._patch(Hook.CONNECTION_CLOSE)
            return
        if hook is Hook.PROTOCOL_CLOSE:
            proto = getattr(handler, "ws_connection", None)
            if proto is None:
                raise ValueError("the handler has no WebSocket connection to hook")
            self._patch_method(proto, "close", hook)
            return
        if hook is Hook.STREAM_CLOSE:
            self._patch_stream(handler)
            return
        self._patch_method(handler, _HANDLER_METHODS[hook], hook)

    def _patch_method(self, obj: Any, name: str, hook: Hook) -> None:
        before = obj.__dict__.get(name)
        original: Callable[..., Any]
        if before is not None:  # already patched by someone else: call that
            original = before
        else:  # the class's method, without a strong reference back to obj
            unbound = getattr(type(obj), name)
            obj_ref = weakref.ref(obj)

            def original(*args: Any, **kwargs: Any) -> Any:
                return unbound(obj_ref(), *args, **kwargs)

        hooks_ref = weakref.ref(self)
        after = hook is Hook.CONNECTION_CLOSE

        def patch(*args: Any, **kwargs: Any) -> Any:
            hooks = hooks_ref()
            if hooks is None:
                return original(*args, **kwargs)
            hooks.run(hook)
            if not after:
                return original(*args, **kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                hooks.run(Hook.AFTER_CONNECTION_CLOSE)
                hooks.release()

        patch.__doc__ = getattr(original, "__doc__", None)
        obj.__dict__[name] = patch
        self._patches.append((weakref.ref(obj), name, patch, before))

    def _patch_stream(self, handler: tornado.web.RequestHandler) -> None:
        conn = getattr(handler, "ws_connection", None)
        stream = getattr(conn, "stream", None)
        if stream is None:
            raise ValueError("the handler has no stream to hook")
        previous = iostream.close_callback(stream)
        hooks_ref = weakref.ref(self)

        def on_stream_close() -> None:
            hooks = hooks_ref()
            try:
                if hooks is not None:
                    hooks.run(Hook.STREAM_CLOSE)
            finally:
                if previous is not None:
                    previous()

        stream.set_close_callback(on_stream_close)
        self._patches.append((weakref.ref(stream), "_close_callback", on_stream_close, previous))
