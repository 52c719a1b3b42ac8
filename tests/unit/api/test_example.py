"""The embedding example runs as documented."""

from __future__ import annotations

import httpx

from examples.embed_fastapi import app, chat_queue


async def test_example_app_streams_and_answers() -> None:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]})
            assert 'event: token\ndata: {"text":"hi"}' in r.text
            assert (await client.get("/ask", params={"q": "a b"})).json() == {
                "answer": "a b",
                "finish_reason": "stop",
            }
    assert chat_queue.load().processing == 0
