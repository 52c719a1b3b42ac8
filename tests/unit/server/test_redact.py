"""The access log's redaction of secret query parameters."""

from __future__ import annotations

import logging

import pytest

from chatqueue.server.serve import RedactSecrets, redact_query


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/chat/history", "/chat/history"),
        ("/chat/history?conversation_id=c-secret", "/chat/history?conversation_id=[redacted]"),
        ("/x?a=1&conversation_id=c-secret&b=2", "/x?a=1&conversation_id=[redacted]&b=2"),
        ("/x?conversation%5Fid=c-secret", "/x?conversation%5Fid=[redacted]"),
        ("/x?conversation_id", "/x?conversation_id=[redacted]"),
        ("/x?conversation_idx=keep", "/x?conversation_idx=keep"),
    ],
)
def test_secret_query_values_are_redacted(path: str, logged: str) -> None:
    assert redact_query(path) == logged


def test_the_filter_rewrites_only_the_path_argument() -> None:
    args = ("127.0.0.1:5", "GET", "/chat/history?conversation_id=c-secret", "1.1", 200)
    record = logging.LogRecord("uvicorn.access", 20, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)
    assert RedactSecrets().filter(record)
    assert (
        record.getMessage()
        == '127.0.0.1:5 - "GET /chat/history?conversation_id=[redacted] HTTP/1.1" 200'
    )
