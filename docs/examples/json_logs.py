"""JSON log lines with the library's connection fields (standard ``logging`` only).

Every record of ``tornado_longconn`` carries ``longconn_conn``, ``longconn_remote``,
``longconn_user`` and ``longconn_topic`` (see :mod:`tornado_longconn.logfields`). A
formatter that writes them as JSON keys is all it takes; ``structlog``'s
``ProcessorFormatter`` or ``python-json-logger`` pick them up the same way, as
extra attributes of the record.

    python docs/examples/json_logs.py     # logs one line about a fake connection
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from tornado_longconn.logfields import FIELDS, ConnectionLogAdapter, LogFieldsFilter


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the four fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:  # None where the field does not apply
            line[name] = getattr(record, name, None)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Log everything as JSON lines to ``stream`` (default stderr); returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LogFieldsFilter())  # records of other libraries get the keys too
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def main() -> None:
    setup_logging(sys.stdout)

    class Request:
        remote_ip = "203.0.113.7"

    class Handler:  # stands in for your WebSocketHandler
        request = Request()

    log = ConnectionLogAdapter(logging.getLogger("chat"), Handler(), topic="lobby")
    log.info("joined")


if __name__ == "__main__":
    main()
