"""The edge of a real server: security headers, what its log keeps out, rate limits, the
per-user cap without keys, and slow connections."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

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
        bad = c.post(COMPLETIONS, json={"messages": [{"role": "user", "content": prompt}], "n": 2})
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
