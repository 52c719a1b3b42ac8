"""`chatqueue chat`: a console chat that streams the reply as it comes, either in this process
(a ChatQueue built from Settings) or against a running server's POST /chat."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from chatqueue.api.build import chat_queue_for
from chatqueue.chat import ChatService
from chatqueue.config import Settings
from chatqueue.history.memory import MemoryStore
from chatqueue.history.types import ChatParams
from chatqueue.types import Finished, FinishReason, Queued, Token

HELP = "Type a message. /new starts over, /quit (or Ctrl-D) leaves, Ctrl-C stops a reply."


@dataclass(frozen=True, slots=True)
class ReplyEnd:
    finish_reason: str
    dropped_turns: int = 0
    error: str | None = None


ConsoleEvent = Queued | Token | ReplyEnd


class ChatBackend(Protocol):
    async def open(self) -> None: ...

    def reply(self, message: str) -> AsyncIterator[ConsoleEvent]:
        """The reply's events; leaving the iteration early stops the generation."""
        ...

    async def clear(self) -> None: ...

    async def close(self) -> None: ...


class LocalChat:
    """The model in this process, history in memory."""

    def __init__(self, settings: Settings, params: ChatParams) -> None:
        self._cq = chat_queue_for(settings)
        self._service = ChatService(self._cq, MemoryStore(), system_prompt=settings.system_prompt)
        self._params = params

    async def open(self) -> None:
        await self._cq.start_queue_worker()
        await self._cq.wait_ready()

    async def reply(self, message: str) -> AsyncIterator[ConsoleEvent]:
        reply = await self._service.start("console", message, self._params)
        try:
            async with reply.stream:
                async for event in reply.stream:
                    if isinstance(event, Token):
                        await reply.add_text(event.text)
                        yield event
                    elif isinstance(event, Queued):
                        yield event
                    elif isinstance(event, Finished):
                        await reply.finish(event)
                        error = str(event.error) if event.reason is FinishReason.ERROR else None
                        yield ReplyEnd(event.reason.value, reply.dropped_turns, error)
        finally:
            await reply.save()

    async def clear(self) -> None:
        await self._service.store.clear("console")

    async def close(self) -> None:
        await self._cq.stop(5.0)


class RemoteChat:
    """A running server's POST /chat; the session cookie keeps the conversation."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=httpx.Timeout(30, read=None)
        )
        self._params = params

    async def open(self) -> None:
        if self._params:
            res = await self._client.put("/chat/params", json=self._params)
            _raise_for_error(res)

    async def reply(self, message: str) -> AsyncIterator[ConsoleEvent]:
        while True:
            async with self._client.stream("POST", "/chat", json={"message": message}) as res:
                if res.status_code == 429:
                    await res.aread()
                    wait_s = int(res.headers.get("Retry-After", "2"))
                    print(f"[the server is full; retrying in {wait_s} s]", file=sys.stderr)
                    await asyncio.sleep(wait_s)
                    continue
                if res.status_code != 200:
                    await res.aread()
                    yield ReplyEnd("error", error=_error_message(res))
                    return
                async for name, data in _sse(res):
                    if name == "queued":
                        yield Queued(data["position"], data["eta_s"])
                    elif name == "token":
                        yield Token(data["text"])
                    elif name == "done":
                        yield ReplyEnd(data["finish_reason"], data.get("dropped_turns", 0))
                    elif name == "error":
                        yield ReplyEnd("error", error=data["message"])
                return

    async def clear(self) -> None:
        _raise_for_error(await self._client.post("/chat/clear"))

    async def close(self) -> None:
        await self._client.aclose()


async def _sse(res: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    name, data = "message", []
    async for line in res.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def _error_message(res: httpx.Response) -> str:
    try:
        return str(res.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {res.status_code}"


def _raise_for_error(res: httpx.Response) -> None:
    if res.status_code >= 400:
        raise RuntimeError(_error_message(res))


async def _print_reply(backend: ChatBackend, message: str) -> None:
    async for event in backend.reply(message):
        if isinstance(event, Queued):
            eta = "" if event.eta_s is None else f", about {event.eta_s:.0f} s"
            print(f"[waiting in line: position {event.position}{eta}]", file=sys.stderr)
        elif isinstance(event, Token):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif event.error is not None:
            print(f"\n[error: {event.error}]", file=sys.stderr)
        else:
            if event.dropped_turns:
                print(f"\n[{event.dropped_turns} oldest exchange(s) left out: context full]")
            print()


def run_console(backend: ChatBackend) -> None:
    """The read-reply loop. One event loop for the whole session (the in-process engine keeps a
    reference to it); Ctrl-C during a reply cancels that run, which aborts the generation."""
    with asyncio.Runner() as runner:
        runner.run(backend.open())
        print(HELP, file=sys.stderr)
        try:
            while True:
                try:
                    message = input("> ").strip()
                except EOFError:
                    break
                if message in ("/quit", "/exit"):
                    break
                if message == "/new":
                    runner.run(backend.clear())
                    continue
                if not message:
                    continue
                try:
                    runner.run(_print_reply(backend, message))
                except KeyboardInterrupt:
                    print("\n[stopped]", file=sys.stderr)
        except KeyboardInterrupt:
            print(file=sys.stderr)
        finally:
            runner.run(backend.close())
