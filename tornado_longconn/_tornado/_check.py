"""Checks that Tornado still has the private names the door reads (internal).

Each door submodule lists the private names it needs and calls these helpers
once, when it is imported: a Tornado release that dropped or renamed one makes
``import tornado_longconn`` raise :class:`~tornado_longconn.exceptions.LongConnError`
naming the attribute and the installed ``tornado.version`` -- never a silent
fallback to a slower or different path.

Instance attributes cannot be looked up on a class, so
:func:`require_init_attrs` reads the names that a class's ``__init__`` assigns
(its code object's ``co_names``); ``tests/test_tornado_canary.py`` then checks on
real objects that each name also behaves as the door assumes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable

import tornado

from ..exceptions import LongConnError

__all__ = [
    "CHECKED_VERSIONS",
    "check_tornado",
    "missing",
    "register",
    "require_attrs",
    "require_init_attrs",
]

#: Tornado versions the door's private names were checked against (source read,
#: canary test run on 6.6.1).
CHECKED_VERSIONS: tuple[str, ...] = ("6.4.2", "6.5.2", "6.6.1")


def missing(owner: str, name: str, why: str = "") -> LongConnError:
    """The error for a private Tornado name that is gone: names it and ``tornado.version``."""
    detail = f": {why}" if why else ""
    return LongConnError(
        f"{owner}.{name} is missing in Tornado {tornado.version} (tornado-longconn was "
        f"checked against Tornado {', '.join(CHECKED_VERSIONS)}){detail}"
    )


def _owner(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def require_attrs(cls: type, names: Iterable[str]) -> None:
    """Raise :class:`LongConnError` unless ``cls`` has every attribute (method) in ``names``."""
    for name in names:
        if not hasattr(cls, name):
            raise missing(_owner(cls), name)


def _init_names(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        code = getattr(init, "__code__", None)
        if code is not None:
            names.update(code.co_names)
    return names


def require_init_attrs(cls: type, names: Iterable[str]) -> None:
    """Raise :class:`LongConnError` unless an ``__init__`` of ``cls`` (or a base) sets each name.

    A name that is a class attribute also counts.
    """
    assigned = _init_names(cls)
    for name in names:
        if name not in assigned and not hasattr(cls, name):
            raise missing(_owner(cls), name, "no longer set by __init__")


_checks: list[Callable[[], None]] = []


def register(check: Callable[[], None]) -> Callable[[], None]:
    """Run ``check`` now (at import of the door module) and remember it for :func:`check_tornado`."""
    check()
    if check not in _checks:
        _checks.append(check)
    return check


def check_tornado() -> None:
    """Check every private Tornado name the door uses; raise ``LongConnError`` for a missing one.

    Imports every submodule of the door (each runs and registers its own check
    when imported) and runs every registered check again. The error names the
    attribute and ``tornado.version``.
    """
    package = importlib.import_module(__package__ or "tornado_longconn._tornado")
    for info in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"{package.__name__}.{info.name}")
        except ModuleNotFoundError as exc:
            # A door to an optional dependency (redis-py) that is not installed.
            if exc.name is None or exc.name.startswith("tornado"):
                raise
    for check in _checks:
        check()
