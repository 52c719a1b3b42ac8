"""Slow connections: a request must arrive in time, its headers within `header_timeout_s` of its
first byte (or of the connection), its body within `body_timeout_s` of its headers.

uvicorn has no such limits: a client that trickles its headers, a byte now and then, holds a
connection (a file descriptor, a parser, a protocol object) for as long as it likes, and a few
thousand of them starve the server of descriptors. `timed_protocol` returns uvicorn's httptools
protocol with two deadlines on each request: each is one timer for the whole phase, armed when it
starts and cancelled when it ends, so trickling bytes never extends it; on expiry the connection
is closed (a body cut short reaches the app as a client disconnect).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """Set `header_timeout_s` and `body_timeout_s` on a subclass (`timed_protocol`)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection: its first byte
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm(self.body_timeout_s, "body")  # a request without a body completes at once

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, timeout_s: float, phase: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(timeout_s, self._expire, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, phase: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.debug("closing a connection whose request %s did not arrive in time", phase)
            self.transport.close()


def timed_protocol(*, header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these deadlines, for `uvicorn.Config(http=...)`."""
    return type(
        "TimedHttpToolsProtocol",
        (TimedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
