"""A client for the WebSocket upload protocol, with resume and a credit window.

``python upload_ws_client.py ws://localhost:8888/ws-upload FILE`` uploads FILE, resuming
an earlier attempt whose id is given as a third argument. As a library::

    result = await upload(url, data, name="photo.jpg")          # {"type": "complete", ...}
    result = await upload(url, data, upload_id=earlier_id)      # resume where the server is

It sends chunks of the size the server announced, never more than ``window`` of them
unacknowledged, and checks every ack's offset. Errors raise ``websockets``'
``ConnectionClosed`` with the server's ``UPLOAD_*`` close code in ``exc.rcvd.code``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from typing import Any

import websockets

HEADER = struct.Struct(">Q")


async def upload(
    url: str,
    data: bytes,
    *,
    name: str | None = None,
    upload_id: str | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """Upload ``data`` (or resume ``upload_id``) and return the server's last message.

    ``on_ready`` sees the ``ready`` message (it carries the id to resume with).
    ``stop_after`` sends only that many chunks and then closes (to test resuming); the
    ``ready`` message is returned then. ``sha256`` is the hex digest of ``data`` if
    the caller has it already (else it is computed here).
    """
    digest = sha256 if sha256 is not None else hashlib.sha256(data).hexdigest()
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        if upload_id is None:
            start = {
                "type": "start",
                "size": len(data),
                "name": name,
                "sha256": digest,
            }
        else:
            start = {"type": "resume", "id": upload_id, "sha256": digest}
        await ws.send(json.dumps(start))
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"unexpected answer {ready!r}")
        if on_ready is not None:
            on_ready(ready)
        offset, window, chunk = ready["offset"], ready["window"], ready["chunk_size"]
        credit = asyncio.Semaphore(window)
        last: dict[str, Any] = ready
        done = asyncio.get_running_loop().create_future()

        async def read_acks(expected: int) -> None:
            nonlocal last
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    last = msg
                    if msg["type"] == "ack":
                        expected = min(expected + chunk, len(data))
                        if msg["offset"] != expected:
                            raise RuntimeError(f"ack at {msg['offset']}, expected {expected}")
                        credit.release()
                    elif msg["type"] == "complete":
                        done.set_result(msg)
                        return
            finally:
                for _ in range(window):  # wake the sender: it checks why we stopped
                    credit.release()

        reader = asyncio.ensure_future(read_acks(offset))
        try:
            sent = 0
            view = memoryview(data)
            while offset < len(data):
                if stop_after is not None and sent >= stop_after:
                    return ready
                await credit.acquire()
                if reader.done():
                    reader.result()
                    raise RuntimeError("server stopped acknowledging")
                await ws.send(HEADER.pack(offset) + view[offset : offset + chunk])
                offset = min(offset + chunk, len(data))
                sent += 1
            waiter = done if not done.done() else None
            if waiter is not None:
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                reader.result()
                raise RuntimeError("connection ended before the upload completed")
            return done.result()  # type: ignore[no-any-return]
        finally:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def main() -> None:
    url, path = sys.argv[1], sys.argv[2]
    with open(path, "rb") as fh:
        data = fh.read()
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    result = asyncio.run(
        upload(url, data, name=path, upload_id=resume, on_ready=lambda m: print(m, flush=True))
    )
    print(result)


if __name__ == "__main__":
    main()
