"""The public API is exactly what ``__all__`` says, and every public name is documented."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import tornado_longconn

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(tornado_longconn.__path__, "tornado_longconn.")
    if not name.rsplit(".", 1)[-1].startswith("_") and not name.endswith(".redis")
)


def test_all_matches_public_names() -> None:
    public = {n for n in vars(tornado_longconn) if not n.startswith("_")} - {
        "annotations",
        # submodules are attributes of the package once imported
        *(m.split(".")[1] for m in MODULES),
    }
    assert set(tornado_longconn.__all__) - {"__version__"} == public


def test_all_names_resolve_and_are_sorted() -> None:
    for name in tornado_longconn.__all__:
        assert hasattr(tornado_longconn, name), name
    assert list(tornado_longconn.__all__) == sorted(tornado_longconn.__all__)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_all_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no docstring"
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module_name} has no __all__"
    for name in names:
        obj = getattr(module, name)
        if callable(obj) or isinstance(obj, type):
            assert obj.__doc__, f"{module_name}.{name} has no docstring"


def test_version_is_a_string() -> None:
    assert isinstance(tornado_longconn.__version__, str)
    assert tornado_longconn.__version__[0].isdigit()
