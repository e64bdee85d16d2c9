"""Close hooks: class-level for WebSockets, one registry per other handler (internal).

For WebSocket handlers, :func:`add_websocket_listener` registers module-level
listeners behind two methods patched once on Tornado's classes (see the comment
above it): nothing is made per connection, which is what a member of a group
costs least with. The per-handler registry below (:class:`HandlerHooks`) serves
streaming ``RequestHandler`` writers (``finish()``) and anything else that needs
a hook on one handler.

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

The registry holds the handler, the protocol and the stream weakly, and listeners
that are bound methods through a weak reference to their object (or, for
module-level listeners, get the handler through the registry's own weak
reference), so hooking a handler creates no reference cycle. Once ``on_connection_close`` ran, every patch is removed
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
import tornado.websocket
from tornado.iostream import IOStream

from . import iostream
from ._check import register, require_attrs, require_init_attrs

__all__ = ["HandlerHooks", "Hook", "add_websocket_listener", "websocket_listeners"]

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


class _Patch:
    """A method patched on one instance: run the hook's listeners, then the original.

    One small slotted object per patched method (no closures and cells): a
    handler lives as long as its connection, and per-connection objects are
    what the cyclic GC walks.
    """

    __slots__ = ("before", "hook", "hooks", "name", "obj", "unbound")

    def __init__(
        self,
        hooks: HandlerHooks,
        obj: Any,
        name: str,
        hook: Hook,
        obj_ref: weakref.ref[Any] | None = None,
    ) -> None:
        # Held strongly: the registry holds the handler, protocol and stream weakly,
        # so patch -> registry makes no cycle (and costs no weak reference).
        self.hooks = hooks
        # The registry's weak reference to the handler is shared, not made again.
        self.obj = weakref.ref(obj) if obj_ref is None else obj_ref
        self.name = name
        self.hook = hook
        # An attribute someone else set on the instance first is kept and called.
        self.before: Callable[..., Any] | None = obj.__dict__.get(name)
        self.unbound: Callable[..., Any] = getattr(type(obj), name)

    def original(self, *args: Any, **kwargs: Any) -> Any:
        before = self.before
        if before is not None:
            return before(*args, **kwargs)
        return self.unbound(self.obj(), *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hooks = self.hooks
        hooks.run(self.hook)
        if self.hook is not Hook.CONNECTION_CLOSE:
            return self.original(*args, **kwargs)
        try:
            return self.original(*args, **kwargs)
        finally:
            hooks.run(Hook.AFTER_CONNECTION_CLOSE)
            hooks.release()
            stream = getattr(getattr(self.obj(), "ws_connection", None), "stream", None)
            iostream.release_error(stream)

    def remove(self) -> None:
        obj = self.obj()
        if obj is None:
            return
        attrs = obj.__dict__
        if attrs.get(self.name) is self:
            if self.before is None:
                del attrs[self.name]
            else:
                attrs[self.name] = self.before


class _StreamPatch:
    """The stream's close callback: run ``STREAM_CLOSE`` listeners, then the previous callback."""

    __slots__ = ("hook", "hooks", "previous", "stream")

    def __init__(self, hooks: HandlerHooks, stream: IOStream) -> None:
        self.hooks = hooks
        self.hook = Hook.STREAM_CLOSE
        self.stream = weakref.ref(stream)
        self.previous = iostream.close_callback(stream)

    def __call__(self) -> None:
        try:
            self.hooks.run(Hook.STREAM_CLOSE)
        finally:
            if self.previous is not None:
                self.previous()

    def remove(self) -> None:
        stream = self.stream()
        if stream is not None and iostream.close_callback(stream) is self:
            stream.set_close_callback(self.previous)


class HandlerHooks:
    """The hook registry of one handler; get it with :meth:`of`.

    :meth:`add` registers a listener (a callable without arguments) for a
    :class:`Hook`; the method behind it is patched on first use. A listener that
    raises is logged and the next one still runs, then the original method.
    A bound method is held through a weak reference to its object (the
    registry never keeps a writer or a group alive); other callables strongly.
    """

    __slots__ = ("__weakref__", "_handler", "_listeners", "_patches", "_released")

    def __init__(self, handler: tornado.web.RequestHandler) -> None:
        self._handler = weakref.ref(handler)
        # (hook, weak reference to the method's object or None, function)
        # Flat triples (hook, weak reference to the listener's object or None,
        # function): a tuple per listener would be one more object per connection.
        self._listeners: list[Any] = []
        self._patches: list[_Patch | _StreamPatch] = []
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
        if hook not in self._listeners[::3]:
            self._patch(hook)
        if isinstance(listener, MethodType):
            self._listeners += (hook, weakref.ref(listener.__self__), listener.__func__)
        else:
            self._listeners += (hook, None, listener)

    def add_handler_listener(
        self, hook: Hook, listener: Callable[[tornado.web.RequestHandler], object]
    ) -> None:
        """Run ``listener(handler)`` at ``hook`` while the handler is alive.

        For a module-level function: the registry's own weak reference to the
        handler is reused, so the listener costs one tuple and no closure.
        """
        if hook not in self._listeners[::3]:
            self._patch(hook)
        self._listeners += (hook, self._handler, listener)

    def discard(self, hook: Hook, listener: Listener) -> None:
        """Stop calling ``listener`` at ``hook`` (the patch stays; nothing if absent)."""
        if isinstance(listener, MethodType):
            owner: object = listener.__self__
            func: object = listener.__func__
        else:
            owner, func = None, listener
        kept: list[Any] = []
        for entry in self._entries():
            if not (
                entry[0] is hook
                and entry[2] is func
                and (
                    entry[1] is None
                    if owner is None
                    else entry[1] is not None and entry[1]() is owner
                )
            ):
                kept += entry
        self._listeners[:] = kept

    def _entries(self) -> list[tuple[Hook, weakref.ref[Any] | None, Callable[..., object]]]:
        """The listeners as ``(hook, ref, function)`` triples (a copy)."""
        flat = self._listeners
        return list(zip(flat[::3], flat[1::3], flat[2::3], strict=True))

    def run(self, hook: Hook) -> None:
        """Call the listeners of ``hook`` (each failure logged, never raised)."""
        for h, ref, func in self._entries():
            if h is not hook:
                continue
            try:
                if ref is None:
                    func()
                else:
                    owner = ref()
                    if owner is not None:
                        func(owner)
            except Exception:
                # Imported here: the logfields module imports this package.
                from ..logfields import log_fields as _log_fields

                log.exception(
                    "%s listener %r failed",
                    hook.value,
                    func,
                    extra=_log_fields(self._handler(), topic=None),
                )

    def release(self) -> None:
        """Remove every patch (putting back what was there) and every listener."""
        self._released = True
        self._listeners.clear()
        patches, self._patches = self._patches, []
        for patch in patches:
            patch.remove()
        handler = self._handler()
        if handler is not None and handler.__dict__.get(_ATTR) is self:
            del handler.__dict__[_ATTR]

    # -- patches ---------------------------------------------------------------

    def _patch(self, hook: Hook) -> None:
        handler = self._handler()
        if handler is None:
            return
        if hook is Hook.AFTER_CONNECTION_CLOSE:
            if not any(p.hook is Hook.CONNECTION_CLOSE for p in self._patches):
                self._patch(Hook.CONNECTION_CLOSE)
            return
        if any(p.hook is hook for p in self._patches):
            return
        patch: _Patch | _StreamPatch
        if hook is Hook.PROTOCOL_CLOSE:
            proto = getattr(handler, "ws_connection", None)
            if proto is None:
                raise ValueError("the handler has no WebSocket connection to hook")
            patch = _Patch(self, proto, "close", hook)
            proto.__dict__["close"] = patch
        elif hook is Hook.STREAM_CLOSE:
            stream = getattr(getattr(handler, "ws_connection", None), "stream", None)
            if stream is None:
                raise ValueError("the handler has no stream to hook")
            patch = _StreamPatch(self, stream)
            stream.set_close_callback(patch)
        else:
            name = _HANDLER_METHODS[hook]
            patch = _Patch(self, handler, name, hook, self._handler)
            handler.__dict__[name] = patch
        self._patches.append(patch)


# -- class-level WebSocket close hooks -------------------------------------------------
#
# A per-handler registry costs its object, a list, a patch object per method and
# weak references: about 0.9 KiB per connection, paid by every member of a group.
# For WebSocket handlers the same moments are reached through two of Tornado's own
# methods, patched once on Tornado's classes (not on the user's handler classes):
#
# * ``WebSocketProtocol13.close(code, reason)`` -- every close: ``handler.close()``,
#   a close frame received, an abort (``_abort`` closes the stream then calls it);
#   listeners of ``PROTOCOL_CLOSE`` run before it, those of ``STREAM_CLOSE`` after
#   it when the stream is closed by then (also the path of an ``open()`` that raised:
#   Tornado aborts without calling ``on_ws_connection_close``).
# * ``WebSocketHandler.on_ws_connection_close(close_code, close_reason)`` -- called
#   once by the protocol's frame loop when it ends; it calls
#   ``on_connection_close()``. ``CONNECTION_CLOSE`` listeners run before it,
#   ``AFTER_CONNECTION_CLOSE`` ones after it.
#
# Listeners are module-level functions called with the handler (for the protocol
# hooks: ``protocol.handler``, which is a ``WebSocketClientConnection`` on Tornado's
# client side); each looks up what it needs in the handler's ``__dict__``, so a
# connection pays nothing until it closes. Checked against Tornado 6.4.2, 6.5.2, 6.6.1.

_WS_HOOKS: Final = (
    Hook.PROTOCOL_CLOSE,
    Hook.STREAM_CLOSE,
    Hook.CONNECTION_CLOSE,
    Hook.AFTER_CONNECTION_CLOSE,
)
_ws_listeners: dict[Hook, tuple[Callable[[Any], object], ...]] = dict.fromkeys(_WS_HOOKS, ())
_ws_originals: dict[str, Callable[..., Any]] = {}


def _check_protocol_attrs() -> None:
    # ``handler`` and ``stream`` are instance attributes: read from ``__init__``.
    require_init_attrs(tornado.websocket.WebSocketProtocol, ("handler", "stream"))
    require_attrs(tornado.websocket.WebSocketProtocol13, ("close",))
    require_attrs(tornado.websocket.WebSocketHandler, ("on_ws_connection_close",))


register(_check_protocol_attrs)


def _run_ws(hook: Hook, handler: Any) -> None:
    for func in _ws_listeners[hook]:
        try:
            func(handler)
        except Exception:
            from ..logfields import log_fields as _log_fields

            log.exception(
                "%s listener %r failed",
                hook.value,
                func,
                extra=_log_fields(
                    handler if isinstance(handler, tornado.web.RequestHandler) else None,
                    topic=None,
                ),
            )


def _protocol_close(self: Any, code: int | None = None, reason: str | None = None) -> None:
    """``WebSocketProtocol13.close``, with the class-level listeners around it."""
    handler = self.handler
    _run_ws(Hook.PROTOCOL_CLOSE, handler)
    try:
        _ws_originals["close"](self, code, reason)
    finally:
        stream = self.stream
        if stream is None or stream.closed():
            _run_ws(Hook.STREAM_CLOSE, handler)


def _on_ws_connection_close(
    self: Any, close_code: int | None = None, close_reason: str | None = None
) -> None:
    """``WebSocketHandler.on_ws_connection_close``, with the listeners around it."""
    _run_ws(Hook.CONNECTION_CLOSE, self)
    try:
        _ws_originals["on_ws_connection_close"](self, close_code, close_reason)
    finally:
        _run_ws(Hook.AFTER_CONNECTION_CLOSE, self)


def _install_websocket_patches() -> None:
    if _ws_originals:
        return
    proto_cls: Any = tornado.websocket.WebSocketProtocol13
    handler_cls: Any = tornado.websocket.WebSocketHandler
    _ws_originals["close"] = proto_cls.close
    _ws_originals["on_ws_connection_close"] = handler_cls.on_ws_connection_close
    _protocol_close.__doc__ = proto_cls.close.__doc__
    proto_cls.close = _protocol_close
    handler_cls.on_ws_connection_close = _on_ws_connection_close


def add_websocket_listener(hook: Hook, listener: Callable[[Any], object]) -> None:
    """Call ``listener(handler)`` at ``hook`` for every WebSocket connection of the process.

    ``hook`` is ``PROTOCOL_CLOSE``, ``STREAM_CLOSE``, ``CONNECTION_CLOSE`` or
    ``AFTER_CONNECTION_CLOSE`` (see the comment above); ``listener`` must be a
    module-level function that ignores handlers it has nothing attached to (it
    runs for every WebSocket of the process, Tornado's client connections
    included, at most a few times per connection). Adding the same listener
    again changes nothing. The first call patches Tornado's two methods, once.
    Raises ``ValueError`` for any other hook.
    """
    if hook not in _ws_listeners:
        raise ValueError(f"{hook} is not a class-level WebSocket hook")
    _install_websocket_patches()
    if listener not in _ws_listeners[hook]:
        _ws_listeners[hook] = (*_ws_listeners[hook], listener)


def websocket_listeners(hook: Hook) -> tuple[Callable[[Any], object], ...]:
    """The class-level listeners of ``hook``, in the order they run."""
    return _ws_listeners[hook]
