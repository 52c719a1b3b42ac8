"""The chat routes, which a session cookie authenticates, refuse state changes sent by another
site's page (CSRF); the page itself, API clients and configured CORS origins still work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from chatqueue.config import Settings
from chatqueue.server.app import create_app


@asynccontextmanager
async def chat_client(tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    fields = {"engine": "mock", "mock_delay": 0.0, "history": "memory", "data_dir": tmp_path}
    app = create_app(Settings(**{**fields, **settings}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


async def history(c: httpx.AsyncClient) -> list[dict[str, Any]]:
    res = await c.get("/chat/history")
    assert res.status_code == 200
    messages: list[dict[str, Any]] = res.json()["messages"]
    return messages


async def test_a_form_posted_from_another_site_does_not_clear_the_conversation(
    tmp_path: Path,
) -> None:
    async with chat_client(tmp_path) as c:
        assert (await c.post("/chat", json={"message": "keep me"})).status_code == 200
        before = await history(c)
        assert [m["content"] for m in before] == ["keep me", "keep me"]

        forged = [
            {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
        ]
        for headers in forged:
            res = await c.post("/chat/clear", headers=headers)
            assert res.status_code == 403, headers
            assert res.json()["error"]["type"] == "forbidden"
            res = await c.post("/chat", json={"message": "injected"}, headers=headers)
            assert res.status_code == 403, headers
        assert await history(c) == before


async def test_the_page_and_api_clients_still_change_state(tmp_path: Path) -> None:
    async with chat_client(tmp_path) as c:
        assert (await c.post("/chat", json={"message": "hello"})).status_code == 200
        same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
        assert (await c.post("/chat/clear", headers=same)).status_code == 200
        assert await history(c) == []
        # no Origin at all: a client that is not a browser (it holds no user's cookie)
        assert (await c.post("/chat", json={"message": "again"})).status_code == 200
        assert len(await history(c)) == 2


async def test_a_configured_cors_origin_may_post(tmp_path: Path) -> None:
    app_origin = "https://app.example"
    async with chat_client(tmp_path, cors_origins=(app_origin,)) as c:
        headers = {"Origin": app_origin, "Sec-Fetch-Site": "cross-site"}
        res = await c.post("/chat", json={"message": "from the app"}, headers=headers)
        assert res.status_code == 200
