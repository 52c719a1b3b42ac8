"""The edge of a real server: security headers, what its log keeps out, rate limits, the
per-user cap without keys, and slow connections."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat, done_of
from tests.support.http import COMPLETIONS, SAFETY_S, assert_no_server_errors
from tests.support.servers import Server, running_server

MOCK = ("--engine", "mock", "--mock-delay", "0", "--history", "memory")
KEY = "sk-carol-0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for_log(server: Server, text: str) -> str:
    """The server's log, once `text` is in it (a line is written as its response starts)."""
    deadline = time.monotonic() + SAFETY_S
    while text not in (log := server.log()):
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log}"
        time.sleep(0.02)
    return log


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("edge_keyed")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({KEY: {"name": "carol"}}))
    with running_server(*MOCK, "--api-keys", str(keys), "--data-dir", str(tmp), tmp_path=tmp) as s:
        yield s


# -- headers ------------------------------------------------------------------------------------
def test_every_response_says_nosniff_and_no_referrer_and_html_has_a_csp(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=SAFETY_S) as c:
        page, health, missing = c.get("/"), c.get("/health"), c.get("/nothing-here")
    for r in (page, health, missing):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


# -- the log ------------------------------------------------------------------------------------
def test_keys_prompts_and_conversation_ids_stay_out_of_the_log(keyed: Server) -> None:
    prompt = "my-secret-prompt-words"
    with httpx.Client(base_url=keyed.url, headers=bearer(KEY), timeout=SAFETY_S) as c:
        cid = done_of(chat(c, prompt))["conversation_id"]
        assert chat(c, f"{prompt} again", conversation_id=cid)
        assert c.get("/chat/history", params={"conversation_id": cid}).status_code == 200
        assert c.get(f"/chat/history?conversation%5Fid={cid}").status_code == 200
        bad = c.post(COMPLETIONS, json={"messages": [{"role": "user", "content": prompt}], "n": 0})
        assert bad.status_code == 400
        ok = c.post(COMPLETIONS, json={"messages": [{"role": "user", "content": prompt}]})
        assert ok.status_code == 200
    c = httpx.Client(base_url=keyed.url, timeout=SAFETY_S)
    with c:
        assert c.get("/v1/models", headers=bearer(KEY + "x")).status_code == 401
    log = wait_for_log(keyed, "/chat/history?conversation_id=[redacted]")
    assert "/chat/history?conversation%5Fid=[redacted]" in log
    assert cid not in log and KEY not in log and prompt not in log
    assert_no_server_errors(log)


# -- slow connections ---------------------------------------------------------------------------
SLOW_S = 0.5  # the header and body timeouts of the `slow` server


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("edge_slow")
    flags = ("--header-timeout", str(SLOW_S), "--body-timeout", str(SLOW_S), "--data-dir", str(tmp))
    with running_server(*MOCK, *flags, tmp_path=tmp) as s:
        yield s


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=SAFETY_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout, a
    safety net, raises if it never does)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_a_request_whose_headers_never_end_is_closed(slow: Server) -> None:
    with connect(slow) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started >= SLOW_S * 0.9


def test_headers_trickled_a_byte_at_a_time_are_closed_at_the_deadline(slow: Server) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: test\r\n" + b"X-Slow: " + b"a" * 10_000
    with connect(slow) as sock:
        started = time.monotonic()
        for byte in request:
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], SLOW_S / 5)  # the trickle's pace
            if readable:
                break
        else:
            raise AssertionError("still open after the whole trickle")
        assert read_until_closed(sock) == b""
        assert SLOW_S * 0.9 <= time.monotonic() - started < SAFETY_S


def test_a_body_that_never_ends_is_closed(slow: Server) -> None:
    with connect(slow) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"messages": '
        )
        assert read_until_closed(sock) == b""
    assert_no_server_errors(slow.log())


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_request(slow: Server) -> None:
    with connect(slow) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        received = b""
        while b'"ok"' not in received:
            received += sock.recv(4096)
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert read_until_closed(sock) == b""


def test_normal_requests_go_through_beside_slow_ones(slow: Server) -> None:
    with contextlib.ExitStack() as stack:
        stragglers = [stack.enter_context(connect(slow)) for _ in range(20)]
        for sock in stragglers:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        with httpx.Client(base_url=slow.url, timeout=SAFETY_S) as c:
            assert c.get("/health").status_code == 200
            body = {"messages": [{"role": "user", "content": "on time"}]}
            reply = c.post(COMPLETIONS, json=body)
            assert reply.json()["choices"][0]["message"]["content"] == "on time"
        for sock in stragglers:
            assert read_until_closed(sock) == b""


# -- rate limits --------------------------------------------------------------------------------
LIMITED = "sk-limited-0123456789"


@pytest.fixture(scope="module")
def rate_limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("edge_rate")
    with running_server(*MOCK, "--rate-limit", "3", "--data-dir", str(tmp), tmp_path=tmp) as s:
        yield s


def from_address(server: Server, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.url, transport=transport, timeout=SAFETY_S)


def test_an_address_over_the_rate_limit_gets_a_429_with_retry_after(rate_limited: Server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with from_address(rate_limited, "127.0.0.1") as c, from_address(rate_limited, "127.0.0.2") as d:
        assert [c.post(COMPLETIONS, json=body).status_code for _ in range(3)] == [200] * 3
        refused = c.post(COMPLETIONS, json=body)
        also_refused = c.get("/chat/history")
        other_address = d.post(COMPLETIONS, json=body)
        assert c.get("/health").status_code == 200  # not an API route: never limited
    assert refused.status_code == 429 and also_refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limited"
    assert refused.headers["retry-after"] == "20"  # 3 a minute: the next token in 20 s
    assert other_address.status_code == 200


def test_a_keys_own_rate_limit_counts_per_key_holder(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({LIMITED: {"name": "slow", "rate_limit": 2}, KEY: {"name": "c"}}))
    flags = ("--api-keys", str(keys), "--data-dir", str(tmp_path))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with running_server(*MOCK, *flags, tmp_path=tmp_path) as s:
        with from_address(s, "127.0.0.1") as c, from_address(s, "127.0.0.2") as d:
            first = c.post(COMPLETIONS, json=body, headers=bearer(LIMITED))
            second = d.post(COMPLETIONS, json=body, headers=bearer(LIMITED))  # same key, anywhere
            refused = c.post(COMPLETIONS, json=body, headers=bearer(LIMITED))
            others = [c.post(COMPLETIONS, json=body, headers=bearer(KEY)) for _ in range(5)]
        log = s.log()
    assert (first.status_code, second.status_code, refused.status_code) == (200, 200, 429)
    assert refused.headers["retry-after"] == "30"
    assert [r.status_code for r in others] == [200] * 5  # no --rate-limit: the others are free
    assert LIMITED not in log
