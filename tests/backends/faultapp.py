"""One app process of the distributed-backend fault tests.

``python tests/backends/faultapp.py --backend URL --prefix P`` serves the room
of ``tests/multiprocess_server.py`` (``/ws``, ``/publish``, ``/poll``,
``/events``) on a free port of 127.0.0.1, with the backend
:func:`~tornado_longconn.backends.backend_from_url` makes from ``URL``
(``redis+cluster://``, ``redis+sentinel://``, ``nats://``, ...). Prints
``READY <port>`` once it listens; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from tests.multiprocess_server import make_app
from tests.server_process import serve_until_signal
from tornado_longconn.backends import backend_from_url


async def serve(url: str, prefix: str) -> None:
    """Serve the room until SIGTERM/SIGINT."""
    kwargs: dict[str, Any] = {"prefix": prefix}
    if url.startswith("redis"):
        kwargs.update(reconnect_base=0.02, reconnect_cap=0.5)
    backend = backend_from_url(url, **kwargs)
    await backend.start()
    app, hub, waiter = make_app(backend)  # type: ignore[arg-type]
    server = await serve_until_signal(app)
    await waiter.close()
    await hub.close()
    await server.close_all_connections()
    await backend.close()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"app {os.getpid()} %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args.backend, args.prefix))


if __name__ == "__main__":
    main()
