"""Access control and limits over real HTTP: API keys and the admin key, body size, message count,
bad text, token caps, per-user queue caps, CORS, idle keep-alive connections."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatqueue.config import Settings
from tests.support.http import (
    COMPLETIONS,
    HELLO,
    SAFETY_S,
    OpenStream,
    assert_no_server_errors,
    error_of,
    has_content,
    is_queued,
    wait_load,
)
from tests.support.outcomes import send, user_says
from tests.support.servers import CHATQUEUE, Server, running_server

ALICE = "sk-alice-0123456789"
ADMIN = "adm-9876543210"
WRONG = "sk-wrong-5555555555"
MAX_BODY = 2048
LONG = " ".join(["w"] * 1500)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("guarded")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({ALICE: {"name": "alice", "priority": 1}}))
    flags = (
        "--engine", "mock", "--mock-delay", "0", "--api-keys", str(keys), "--admin-key", ADMIN,
        "--max-body-bytes", str(MAX_BODY), "--max-messages", "3", "--max-tokens-cap", "50",
        "--max-prompt-tokens", "100",
        "--cors-origins", "http://a.example", "--cors-origins", "http://b.example,http://c.example",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp) as server:
        yield server


@pytest.fixture(scope="module")
def open_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = (
        "--engine", "mock", "--mock-delay", "0.01", "--max-concurrent", "1",
        "--max-queue-per-user", "2", "--timeout-keep-alive", "1",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("open")) as server:
        yield server


@pytest.fixture
async def anon(guarded: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=SAFETY_S) as c:
        yield c
    assert_no_server_errors(guarded.log())


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- API keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        as_key(WRONG),
        {"Authorization": ALICE},
        {"Authorization": f"Basic {ALICE}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "no scheme", "basic", "empty"],
)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", COMPLETIONS, {"messages": HELLO}),
        ("POST", "/chat", {"message": "hi"}),
        ("GET", "/chat/history", None),
    ],
)
async def test_no_key_or_a_wrong_one_is_a_401(
    anon: httpx.AsyncClient, headers: dict[str, str], method: str, path: str, body: Any
) -> None:
    r = await anon.request(method, path, json=body, headers=headers)
    assert r.status_code == 401
    assert error_of(r)["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert ALICE not in r.text and WRONG not in r.text


async def test_the_right_key_gets_in(anon: httpx.AsyncClient) -> None:
    models = await anon.get("/v1/models", headers=as_key(ALICE))
    reply = await send(anon, user_says("let me in", stream=True), headers=as_key(ALICE))
    assert models.status_code == 200
    assert reply.status == 200 and reply.text == "let me in" and reply.ends_with_done


@pytest.mark.parametrize("path", ["/metrics", "/load"])
async def test_the_admin_key_guards_metrics_and_load(anon: httpx.AsyncClient, path: str) -> None:
    assert (await anon.get(path)).status_code == 401
    assert (await anon.get(path, headers=as_key(ALICE))).status_code == 401
    assert (await anon.get(path, headers=as_key(ADMIN))).status_code == 200
    assert (await anon.get("/health")).status_code == 200  # probes need no key


async def test_load_shows_debug_figures_to_the_admin(anon: httpx.AsyncClient) -> None:
    debug = (await anon.get("/load", headers=as_key(ADMIN))).json()["debug"]
    assert debug["tasks"] >= 1 and debug["open_fds"] >= 3


async def test_no_key_appears_in_the_log(guarded: Server, anon: httpx.AsyncClient) -> None:
    await anon.get("/v1/models", headers=as_key(WRONG))
    await anon.get("/metrics", headers=as_key(ADMIN))
    log = guarded.log()
    assert ALICE not in log and ADMIN not in log and WRONG not in log


def test_a_bad_key_file_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({ALICE: {"nam": "alice"}, WRONG: {"name": "x", "priority": "hi"}}))
    for path, expected in [
        (bad, ("entry 1 name: Field required", "entry 2 priority")),
        (tmp_path / "missing.json", ("cannot read it",)),
    ]:
        done = subprocess.run(
            [CHATQUEUE, "serve", "--engine", "mock", "--api-keys", str(path), "--port", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done
        assert all(e in done.stderr for e in expected) and "--api-keys" in done.stderr
        assert ALICE not in done.stderr + done.stdout and WRONG not in done.stderr + done.stdout


# -- limits -------------------------------------------------------------------------------------
def padded(size: int) -> bytes:
    """A valid request body of exactly `size` bytes."""
    prefix, suffix = '{"messages": [{"role": "user", "content": "hi"}], "pad": "', '"}'
    return (prefix + " " * (size - len(prefix) - len(suffix)) + suffix).encode()


async def test_a_body_over_the_limit_is_a_413(anon: httpx.AsyncClient) -> None:
    headers = {**as_key(ALICE), "Content-Type": "application/json"}
    fits = await anon.post(COMPLETIONS, content=padded(MAX_BODY), headers=headers)
    declared = await anon.post(COMPLETIONS, content=padded(MAX_BODY + 1), headers=headers)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        body = padded(4 * MAX_BODY)
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    async with httpx.AsyncClient(base_url=anon.base_url, timeout=SAFETY_S) as fresh:
        chunked = await fresh.post(COMPLETIONS, content=chunks(), headers=headers)
    assert fits.status_code == 200
    for r in (declared, chunked):
        assert r.status_code == 413 and error_of(r)["type"] == "request_too_large"
    assert chunked.request.headers["transfer-encoding"] == "chunked"


async def test_too_many_messages_is_a_400(anon: httpx.AsyncClient) -> None:
    three = await send(anon, {"messages": HELLO * 3}, headers=as_key(ALICE))
    r = await anon.post(COMPLETIONS, json={"messages": HELLO * 4}, headers=as_key(ALICE))
    assert three.status == 200
    assert r.status_code == 400 and error_of(r)["param"] == "messages"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # Latin-1, not UTF-8
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"messages": [{"role": "user", "content": "a \\udc80 b"}]}',  # a lone surrogate
        b'{"messages": [{"role": "user", "content": "a \\udc80 b"}], "stream": true}',
        b'{"messages": [{"role": "user", "content": "a"}], "stop": ["\\ud800"]}',
        b'{"messages": [{"role": "user", "content": "a"}], "model": "\\ud800"}',
    ],
)
async def test_text_that_is_not_unicode_is_a_400(anon: httpx.AsyncClient, raw: bytes) -> None:
    headers = {**as_key(ALICE), "Content-Type": "application/json"}
    r = await anon.post(COMPLETIONS, content=raw, headers=headers)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"


async def test_token_caps_are_400s(anon: httpx.AsyncClient) -> None:
    key = as_key(ALICE)
    at_cap = await send(anon, user_says("a b", stream=False, max_tokens=50), headers=key)
    over_cap = await anon.post(COMPLETIONS, json=user_says("a b", stream=False, max_tokens=51), headers=key)  # fmt: skip
    long_prompt = await anon.post(COMPLETIONS, json=user_says("w " * 120, stream=True), headers=key)
    assert at_cap.status == 200
    assert over_cap.status_code == 400 and error_of(over_cap)["param"] == "max_tokens"
    assert long_prompt.status_code == 400 and error_of(long_prompt)["param"] == "messages"


@pytest.mark.parametrize("value", [0, -1, "1", None, True])
async def test_queue_timeout_must_be_a_positive_number(
    anon: httpx.AsyncClient, value: object
) -> None:
    body = {"messages": HELLO, "queue_timeout": value}
    r = await anon.post(COMPLETIONS, json=body, headers=as_key(ALICE))
    assert r.status_code == (200 if value is None else 400)


# -- CORS ---------------------------------------------------------------------------------------
def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_cors_allows_the_configured_origins_only(anon: httpx.AsyncClient) -> None:
    for origin in ("http://a.example", "http://b.example", "http://c.example"):
        r = await anon.options(COMPLETIONS, headers=preflight(origin))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        simple = await anon.get("/health", headers={"Origin": origin})
        assert simple.headers["access-control-allow-origin"] == origin
    denied = await anon.options(COMPLETIONS, headers=preflight("http://evil.example"))
    assert "access-control-allow-origin" not in denied.headers
    simple = await anon.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


async def test_cors_is_off_by_default(open_srv: Server) -> None:
    async with httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S) as c:
        r = await c.options(COMPLETIONS, headers=preflight("http://a.example"))
        simple = await c.get("/health", headers={"Origin": "http://a.example"})
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in simple.headers


def test_cors_origins_from_the_environment_may_be_comma_separated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATQUEUE_CORS_ORIGINS", "http://a.example, http://b.example")
    assert Settings().cors_origins == ("http://a.example", "http://b.example")
    monkeypatch.setenv("CHATQUEUE_CORS_ORIGINS", '["http://c.example"]')
    assert Settings().cors_origins == ("http://c.example",)
    monkeypatch.setenv("CHATQUEUE_API_KEY", ALICE)
    assert ALICE not in repr(Settings()) and ALICE not in str(Settings())


# -- per-user queue cap, idle connections ------------------------------------------------------
async def test_a_user_over_the_per_user_cap_is_a_429(open_srv: Server) -> None:
    async with (
        httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S) as c,
        AsyncExitStack() as stack,
    ):
        running = await stack.enter_async_context(OpenStream(c, user_says(LONG, stream=True)))
        await running.read_until(has_content)
        for _ in range(2):
            s = await stack.enter_async_context(
                OpenStream(c, user_says("x", stream=True, user="u"))
            )
            await s.read_until(is_queued)
        refused = await c.post(COMPLETIONS, json=user_says("x", user="u", stream=False))
        # NOTE: without keys the cap counts per client address: another user is another address
        other_address = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        d = await stack.enter_async_context(
            httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S, transport=other_address)
        )
        other = await stack.enter_async_context(
            OpenStream(d, user_says("x", stream=True, user="v"))
        )
        await other.read_until(is_queued)
        await stack.aclose()
        await wait_load(c, processing=0, waiting=0)
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert error_of(refused)["type"] == "user_queue_full"


async def test_without_keys_a_new_user_field_each_request_does_not_lift_the_cap(
    open_srv: Server,
) -> None:
    async with (
        httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S) as c,
        AsyncExitStack() as stack,
    ):
        running = await stack.enter_async_context(OpenStream(c, user_says(LONG, stream=True)))
        await running.read_until(has_content)
        for name in ("flood-1", "flood-2"):
            s = await stack.enter_async_context(
                OpenStream(c, user_says("x", stream=True, user=name))
            )
            await s.read_until(is_queued)
        refused = await c.post(COMPLETIONS, json=user_says("x", user="flood-3", stream=False))
        await stack.aclose()
        await wait_load(c, processing=0, waiting=0)
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert error_of(refused)["type"] == "user_queue_full"


async def test_without_keys_a_new_chat_session_each_request_does_not_lift_the_cap(
    open_srv: Server,
) -> None:
    """/chat's user is the session cookie, which a client may drop every time: the cap counts
    per client address there too."""
    async with AsyncExitStack() as stack:
        c = await stack.enter_async_context(
            httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S)
        )
        running = await stack.enter_async_context(OpenStream(c, user_says(LONG, stream=True)))
        await running.read_until(has_content)
        for _ in range(2):  # each a new client: a new session, no cookie
            fresh = await stack.enter_async_context(
                httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S)
            )
            await stack.enter_async_context(chat_waiting(fresh))
        async with httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S) as fresh:
            refused = await fresh.post("/chat", json={"message": "one more"})
        await stack.aclose()
    async with httpx.AsyncClient(base_url=open_srv.url, timeout=SAFETY_S) as c:
        await wait_load(c, processing=0, waiting=0)
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert error_of(refused)["type"] == "user_queue_full"


@asynccontextmanager
async def chat_waiting(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """A /chat reply held open by the test until it has been told its place in the queue."""
    async with client.stream("POST", "/chat", json={"message": "x"}) as res:
        assert res.status_code == 200
        lines = res.aiter_lines()  # NOTE: kept: a line iterator left to the collector closes
        async for line in lines:  # the response, and the server sees its client leave
            if line == "event: queued":
                break
        yield


def test_an_idle_keep_alive_connection_is_closed(open_srv: Server) -> None:
    port = int(open_srv.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n")
        received = b""
        while b'"ok"' not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        # NOTE: then nothing: the server hangs up after --timeout-keep-alive (the socket's own
        # timeout is only the safety net, and would raise).
        assert sock.recv(4096) == b""
