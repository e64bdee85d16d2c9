"""Server variants, one module each, run as ``python -m benchmarks.servers.<name>``.

Each binds 127.0.0.1, reports to its benchmark through ``benchmarks.harness.emit``
report lines on stdout (``PORT <n>`` first) and exits on SIGTERM.
"""
