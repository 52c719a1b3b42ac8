"""Cookie-authenticated routes refuse what another site's page sends (cross-site request forgery).

NOTE: why more than SameSite. The session cookie is SameSite=Lax, yet a form posted from another
site cleared a signed-in user's conversation in Chromium (a top-level POST navigation may carry
Lax cookies for two minutes after they are set). Browsers say where a request comes from: `Origin`
on every POST, `Sec-Fetch-Site` on every request. A request whose origin is neither this server
nor one of `--cors-origins` is refused; clients that are not browsers send neither header and
are let through (they hold no user's cookie).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request

from chatqueue.errors import Forbidden

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def same_origin(request: Request) -> None:
    """FastAPI dependency: 403 for a state-changing request sent by another site's page."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin")
    allowed: tuple[str, ...] = request.app.state.settings.cors_origins
    if origin is not None and origin in allowed:
        return
    site = request.headers.get("sec-fetch-site")
    foreign_origin = origin is not None and urlsplit(origin).netloc != request.headers.get("host")
    if site in ("cross-site", "same-site") or foreign_origin:
        raise Forbidden("This request came from another site's page and was refused.")
