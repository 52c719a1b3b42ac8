"""Who is calling: API keys (`Authorization: Bearer <key>`) on /v1 and /chat, an admin key on
/metrics and /load.

`--api-key KEY` is one shared key: it opens the door but says nothing of who is calling, so
fairness falls back to the OpenAI `user` field (or the chat session). `--api-keys FILE` names each
key's holder, who is then the user the queue takes turns between, with a priority and an optional
cap of their own:

    {"sk-alice-...": {"name": "alice", "priority": 0, "max_queue": 4, "rate_limit": 60}}

Keys are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every
configured key, so neither the timing nor any message or log line tells one key from another.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from chatqueue.config import Settings
from chatqueue.errors import Unauthorized
from chatqueue.server.ratelimit import Limiter


class KeyFileError(ValueError):
    """The --api-keys file cannot be used; the message says why, never with a key in it."""


class KeyHolder(BaseModel):
    """One entry of the --api-keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    priority: int = 0
    max_queue: int | None = Field(None, ge=1, description="Waiting requests; over the server's")
    rate_limit: float | None = Field(None, gt=0, description="Requests a minute; over the server's")


_KEY_FILE = TypeAdapter(dict[str, KeyHolder])


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller, as the queue sees it. `name` is None when the key (if any) names no one."""

    name: str | None = None
    priority: int = 0
    max_queue: int | None = None
    rate_limit: float | None = None  # requests a minute, in place of --rate-limit

    def user(self, fallback: str | None = None) -> str:
        """The user the queue takes turns between: the key's holder, else `fallback` (the OpenAI
        `user` field, the chat session), else everyone anonymous together."""
        return self.name or fallback or ""


ANONYMOUS = Identity()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_key_file(path: Path) -> dict[str, KeyHolder]:
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"--api-keys {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise KeyFileError(f"--api-keys {path}: not valid JSON ({exc})") from None
    try:
        holders = _KEY_FILE.validate_python(raw)
    except ValidationError as exc:
        # NOTE: the location of an error is the key itself; say which entry by its place instead.
        order = list(raw) if isinstance(raw, dict) else []
        reasons = [_reason(err, order) for err in exc.errors()]
        raise KeyFileError(f"--api-keys {path}: " + "; ".join(reasons)) from None
    if not holders:
        raise KeyFileError(f"--api-keys {path}: no keys in it")
    if any(not key.strip() for key in holders):
        raise KeyFileError(f"--api-keys {path}: an empty key")
    return holders


def _reason(err: ErrorDetails, order: list[str]) -> str:
    loc = list(err["loc"])
    if not loc:
        return 'expected an object: {"<key>": {"name": ..., "priority": ...}}'
    where = f"entry {order.index(loc[0]) + 1}" if loc[0] in order else "an entry"
    field = ".".join(str(x) for x in loc[1:])
    return f"{where}{' ' + field if field else ''}: {err['msg']}"


class Keyring:
    """The configured keys, as digests, and who holds each."""

    def __init__(
        self, holders: dict[str, Identity] | None = None, *, admin_key: str | None = None
    ) -> None:
        self._holders = [(_digest(key), who) for key, who in (holders or {}).items()]
        self._admin = _digest(admin_key) if admin_key else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        """Raises KeyFileError for a bad --api-keys file, at start-up."""
        holders: dict[str, Identity] = {}
        if settings.api_key is not None:
            holders[settings.api_key.get_secret_value()] = ANONYMOUS
        if settings.api_keys is not None:
            for key, h in load_key_file(settings.api_keys).items():
                holders[key] = Identity(h.name, h.priority, h.max_queue, h.rate_limit)
        admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        return cls(holders, admin_key=admin)

    @property
    def is_open(self) -> bool:
        return not self._holders

    @property
    def has_admin_key(self) -> bool:
        return self._admin is not None

    def identify(self, authorization: str | None) -> Identity:
        """The holder of the bearer key, or Unauthorized. Anyone, when no key is configured."""
        if self.is_open:
            return ANONYMOUS
        presented = _digest(_bearer(authorization))
        found: Identity | None = None
        for digest, who in self._holders:  # NOTE: no early exit: every key is compared
            if hmac.compare_digest(digest, presented) and found is None:
                found = who
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return found

    def check_admin(self, authorization: str | None) -> None:
        if self._admin is not None and not hmac.compare_digest(
            self._admin, _digest(_bearer(authorization))
        ):
            raise Unauthorized("This endpoint needs the admin key.")


def _bearer(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "No API key provided. Pass it in the header 'Authorization: Bearer <key>'."
        )
    return key.strip()


def keyring(request: Request) -> Keyring:
    ring: Keyring = request.app.state.keyring
    return ring


async def identity(request: Request) -> Identity:
    """FastAPI dependency: who is calling; raises 401 when keys are configured and the request
    carries none of them, 429 RateLimited when the caller is over its rate limit (if one is set).
    `Depends(identity)` on a router guards all its routes."""
    who = keyring(request).identify(request.headers.get("authorization"))
    settings: Settings = request.app.state.settings
    per_minute = who.rate_limit or settings.rate_limit
    if per_minute is not None:
        limiter: Limiter = request.app.state.rate_limiter
        await limiter.take(caller_of(request, who), per_minute)
    return who


def caller_of(request: Request, who: Identity) -> str:
    """Whom a limit counts against: the key's holder when the key names one, else the client's
    address (behind a proxy: the proxy's, unless uvicorn is told to trust its headers)."""
    if who.name is not None:
        return f"key:{who.name}"
    return f"address:{request.client.host if request.client else ''}"


async def admin(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the admin key (when one is set)."""
    keyring(request).check_admin(request.headers.get("authorization"))


Caller = Annotated[Identity, Depends(identity)]
"""A route parameter `who: Caller` is the caller's Identity (401 first when keys are set)."""
