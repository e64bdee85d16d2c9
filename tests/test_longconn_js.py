"""The JavaScript client's own tooling: Node unit tests, TypeScript declarations, npm package.

* ``node --test tests/js/*.test.mjs`` runs the pure logic of ``longconn.js``
  (backoff, cursors, cursor maps, frame parsing, pending requests) and its
  ``Session`` against fake transports; skipped when ``node`` is not installed.
* ``tsc -p tsconfig.json`` type-checks ``longconn.d.ts`` through the examples in
  ``docs/examples/*.ts`` (strict); skipped until ``npm ci`` installed the pinned
  TypeScript (``.ci/run`` does).
* ``package.json`` points npm at the very files the Python package ships.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tornado_longconn.staticfiles import static_path
from tornado_longconn.testing import scaled

NODE = shutil.which("node")
TSC = ROOT / "node_modules" / ".bin" / "tsc"
PACKAGE = json.loads((ROOT / "package.json").read_text(encoding="utf-8"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=scaled(120), check=False
    )


@pytest.mark.skipif(NODE is None, reason="node is not installed (Node.js >= 20 runs tests/js)")
def test_node_unit_tests_pass() -> None:
    assert NODE is not None
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert files, "no tests/js/*.test.mjs"
    result = run(NODE, "--test", *files)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.MULTILINE))
    assert int(summary["tests"]) > 0 and summary["fail"] == "0", summary


@pytest.mark.skipif(NODE is None, reason="node is not installed (tsc needs Node.js)")
@pytest.mark.skipif(
    not TSC.exists(), reason="TypeScript is not installed: run `npm ci` at the repository root"
)
def test_typescript_declarations_check_against_the_examples() -> None:
    result = run(str(TSC), "-p", "tsconfig.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_json_points_at_the_shipped_client() -> None:
    assert (ROOT / PACKAGE["main"]).resolve() == (ROOT / PACKAGE["browser"]).resolve()
    assert str((ROOT / PACKAGE["main"]).resolve()) == static_path("longconn.js")
    assert str((ROOT / PACKAGE["types"]).resolve()) == static_path("longconn.d.ts")
    assert sorted(PACKAGE["files"]) == sorted([PACKAGE["main"], PACKAGE["types"]])
    source = (ROOT / PACKAGE["main"]).read_text(encoding="utf-8")
    version = re.search(r'var VERSION = "([^"]+)";', source)
    assert version is not None and version.group(1) == PACKAGE["version"]
    # TypeScript is pinned exactly, and the lock file matches it (npm ci installs it).
    pinned = PACKAGE["devDependencies"]["typescript"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)
    lock = json.loads((ROOT / "package-lock.json").read_text(encoding="utf-8"))
    assert lock["packages"]["node_modules/typescript"]["version"] == pinned


def test_declarations_name_every_public_export() -> None:
    declared = set(
        re.findall(
            r"^export (?:const|function|class) (\w+)",
            (ROOT / PACKAGE["types"]).read_text(encoding="utf-8"),
            re.MULTILINE,
        )
    )
    text = Path(static_path("longconn.js")).read_text(encoding="utf-8")
    block = text[text.rindex("  return {\n    VERSION") :]
    exported = set(re.findall(r"^    (\w+): ", block, re.MULTILINE))
    public = {name for name in exported if not name.startswith("_")}
    assert public == declared, (public - declared, declared - public)
