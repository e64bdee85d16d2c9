"""Reproducible benchmarks of tornado-longconn against its peers.

Run from the repository root: ``python -m benchmarks.bench_<part> [--tiny]``, or all of
them with ``python benchmarks/run_all.py [--tiny]``. The shared machinery is the
:mod:`benchmarks.harness` package; server variants live in :mod:`benchmarks.servers`.
"""
