"""Property-based: requests generated from the server's own OpenAPI schema, valid and not, never
get a 5xx (mock engine, real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis

from chatqueue.config import Settings
from chatqueue.server.app import create_app
from tests.support.http import assert_no_server_errors
from tests.support.servers import Server, running_server

# NOTE: the schema is what the app serves at /openapi.json, taken at import time (schemathesis
# parametrizes at collection; its fixture-based loader does not work with pytest 9). The server
# under test is checked to serve the same document.
_OWN = create_app(Settings(engine="mock", history="memory", session_secret="schema")).openapi()
schema = schemathesis.openapi.from_dict(_OWN)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = (
        "--engine", "mock", "--mock-delay", "0", "--max-concurrent", "4", "--max-queue-size", "16",
        "--history", "memory", "--max-tokens-cap", "64",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("fuzzed")) as server:
        assert httpx.get(f"{server.url}/openapi.json").json() == _OWN
        yield server
        assert_no_server_errors(server.log())


@schema.parametrize()
@hypothesis.settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_request_from_the_schema_gets_a_5xx(
    case: schemathesis.Case[Any], fuzzed: Server
) -> None:
    r = case.call(base_url=fuzzed.url, timeout=30)
    if r.status_code >= 500:
        # The one 5xx a well-formed request may earn: a queue_timeout so small (5e-324 s) that
        # it passed before the request could be scheduled.
        error = r.json().get("error", {})
        assert (r.status_code, error.get("type")) == (503, "queue_timeout"), (case.body, r.text)
