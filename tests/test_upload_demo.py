"""The demo's /files/ tus endpoint with --cors-origin: what a browser tus client needs."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.test_demo import demo_server
from tornado_longconn.testing import scaled

TUS = {"Tus-Resumable": "1.0.0"}


async def test_cors_origin_option_allows_those_origins_only(tmp_path: Path) -> None:
    app = "https://app.example"
    async with (
        demo_server(
            tmp_path, "--cors-origin", app, "--cors-origin", "http://localhost:5173"
        ) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        preflight = await client.options(
            "/files/",
            headers={
                "Origin": app,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "tus-resumable,upload-length,upload-concat",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == app
        allowed = {
            h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
        }
        assert {"tus-resumable", "upload-length", "upload-concat", "upload-defer-length"} <= allowed
        assert "PATCH" in preflight.headers["Access-Control-Allow-Methods"]
        created = await client.post(
            "/files/", headers={**TUS, "Upload-Length": "3", "Origin": "http://localhost:5173"}
        )
        assert created.status_code == 201
        exposed = {h.strip() for h in created.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Location", "Upload-Offset", "Upload-Concat"} <= exposed
        other = await client.post(
            "/files/", headers={**TUS, "Upload-Length": "3", "Origin": "https://evil.example"}
        )
        assert "Access-Control-Allow-Origin" not in other.headers
    async with (
        demo_server(tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        created = await client.post("/files/", headers={**TUS, "Upload-Length": "3", "Origin": app})
        assert "Access-Control-Allow-Origin" not in created.headers  # none by default
