"""Run every ``benchmarks/bench_*.py``: ``python benchmarks/run_all.py [--tiny] [-k TEXT]``.

Each benchmark runs as a module, ``python -m benchmarks.bench_<part>``, from the
repository root (``--dir`` names another package directory; its parent is then the
working directory). With ``--tiny`` each script runs its scenarios once at a tiny size (CI: delivery is
verified, nothing is written to ``benchmarks/results/``); without it, each runs in
full and writes its results file. Prints one line per script and exits non-zero if
any script fails (non-zero exit or timeout).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["command", "discover", "main"]

BENCH_DIR = Path(__file__).resolve().parent


def discover(directory: Path = BENCH_DIR) -> list[Path]:
    """The benchmark scripts in ``directory``, sorted by name."""
    return sorted(directory.glob("bench_*.py"))


def command(script: Path, *args: str) -> list[str]:
    """``python -m <package>.<module> ARGS...`` for a script of a package directory.

    Run it from ``script.parent.parent``. Raises ``ValueError`` if the script's
    directory is not a package (no ``__init__.py``).
    """
    if not (script.parent / "__init__.py").is_file():
        raise ValueError(f"{script.parent} is not a package (no __init__.py)")
    return [sys.executable, "-m", f"{script.parent.name}.{script.stem}", *args]


def main(argv: list[str] | None = None) -> int:
    """Run the scripts; return 0 if all passed, 1 otherwise."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for CI")
    p.add_argument("-k", dest="select", default="", help="only scripts whose name contains this")
    p.add_argument("--timeout", type=float, default=None, help="seconds per script")
    p.add_argument("--dir", type=Path, default=BENCH_DIR, help="where the scripts are")
    args = p.parse_args(argv)
    timeout = args.timeout or (120.0 if args.tiny else 900.0)
    scripts = [s for s in discover(args.dir) if args.select in s.name]
    if not scripts:
        print("no benchmark scripts found", file=sys.stderr)
        return 1
    failed = []
    t_all = time.monotonic()
    for script in scripts:
        cmd = command(script, *(["--tiny"] if args.tiny else []))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=script.parent.parent
            )
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"FAILED (timeout after {timeout:.0f} s)"
            output = "".join(
                x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                for x in (exc.stdout, exc.stderr)
            )
        print(f"{script.name:<32} {status:<24} {time.monotonic() - t0:6.1f} s", flush=True)
        if status != "ok":
            failed.append(script.name)
            print("    " + "\n    ".join(str(output).strip().splitlines()[-20:]), flush=True)
    total = time.monotonic() - t_all
    print(f"{len(scripts) - len(failed)}/{len(scripts)} benchmark scripts passed in {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
