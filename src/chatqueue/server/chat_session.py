"""Who is chatting: a signed session cookie for the page, a signed conversation id for API callers.

The session cookie (Starlette's SessionMiddleware, signed with itsdangerous) holds a random
session id, which keys the sampling parameters, and the page's current conversation id. A
conversation id is random and signed by the server, so one cannot be guessed or made up.

Whose it is: under --api-keys, the key holder's who made it. Their name is signed into the id
(the signature covers the id and the owner; the id does not show the owner), so another key
holder's request naming it fails the check and gets the same 404 as a made-up id: neither its
existence nor its owner is told. With no keys, or one shared --api-key, which names no one, the
id is a bearer token: whoever holds it may continue that conversation (that is how API callers,
who may keep no cookies, go on with one), and only the session that made it is handed it.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, Signer
from starlette.requests import Request

from chatqueue.config import Settings
from chatqueue.errors import NotFound
from chatqueue.server.auth import Identity

log = logging.getLogger(__name__)

SESSION_COOKIE = "chatqueue_session"
SESSION_MAX_AGE_S = 180 * 24 * 3600


def session_secret(settings: Settings) -> str:
    """Settings.session_secret, else one made once and kept in the data folder, so a restart
    (or another server process on the same folder) keeps everyone's sessions."""
    if settings.session_secret:
        return settings.session_secret
    path = settings.data_dir / "session_secret"
    try:
        return _read_or_create(path)
    except OSError as exc:
        log.warning("cannot keep a session secret in %s (%s); sessions end on restart", path, exc)
        return secrets.token_urlsafe(32)


def _read_or_create(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_text(secrets.token_urlsafe(32))
        tmp.chmod(0o600)
        # NOTE: link, not rename: of two processes starting at once, the first one wins and
        # the other reads its secret.
        try:
            path.hardlink_to(tmp)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


class ConversationIds:
    """`c<random>.<signature of the random part and the owner>`; the owner "" (no one named)
    signs the random part alone, as ids were signed before owners were."""

    def __init__(self, secret: str) -> None:
        self._signer = Signer(secret, salt="chatqueue.conversation")

    def new(self, owner: str = "") -> str:
        value = f"c{secrets.token_hex(16)}"
        return f"{value}.{self._signature(value, owner)}"

    def is_valid(self, conversation_id: str, owner: str = "") -> bool:
        value, _, signature = conversation_id.rpartition(".")
        try:
            return self._signer.verify_signature(_signed(value, owner), signature)
        except BadSignature:
            return False

    def _signature(self, value: str, owner: str) -> str:
        return self._signer.get_signature(_signed(value, owner)).decode()


def _signed(value: str, owner: str) -> str:
    return f"{value}\x00{owner}" if owner else value


@dataclass(frozen=True, slots=True)
class ChatSession:
    session_id: str
    conversation_id: str


def owner_of(who: Identity) -> str:
    """Whose conversations a caller's are: the key holder's name; "" when no key names one."""
    return who.name or ""


def chat_session(
    request: Request, conversation_id: str | None = None, *, owner: str = ""
) -> ChatSession:
    """The caller's session (made on first use) and the conversation it means: the one named,
    else the session's current one (made on first use); either must be `owner`'s, else 404."""
    ids: ConversationIds = request.app.state.conversation_ids
    session = request.session
    if not isinstance(session.get("sid"), str):
        session["sid"] = secrets.token_urlsafe(16)
    if conversation_id is not None:
        if not ids.is_valid(conversation_id, owner):
            raise NotFound("There is no conversation with this id.", param="conversation_id")
        return ChatSession(session["sid"], conversation_id)
    current = session.get("conversation_id")
    if not isinstance(current, str) or not ids.is_valid(current, owner):
        current = session["conversation_id"] = ids.new(owner)
    return ChatSession(session["sid"], current)
