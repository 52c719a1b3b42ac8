"""One reply in a conversation: read the history, fit it to the context, submit, and record the
reply from the moment it is admitted: as it streams, and complete or interrupted when it ends. Used by the chat routes and the console chat."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from chatqueue.api import QueueService, RequestStream
from chatqueue.chat.window import fit_history
from chatqueue.errors import InvalidRequest, StoreUnavailable
from chatqueue.history import HistoryStore
from chatqueue.history.types import ChatParams, Turn, new_message_id
from chatqueue.types import Finished, FinishReason

_COMPLETE = (FinishReason.STOP, FinishReason.LENGTH)

log = logging.getLogger(__name__)


# NOTE: what streamed is written about once a second (on the first token after a second since
# the last write): a server killed mid-reply keeps all but the last second of it, at one write a
# second per reply rather than one per token.
FLUSH_EVERY_S = 1.0


@dataclass
class Reply:
    """An assistant reply being generated, already in the history (empty, marked interrupted)
    when it is admitted. Feed it the streamed text (`add_text`) and the finish (`finish`, which
    stores the whole reply before returning, so before the client hears `done`); `save` records
    what was streamed if it never finished."""

    conversation_id: str
    stream: RequestStream
    params: ChatParams
    dropped_turns: int
    store: HistoryStore
    message_id: str = field(default_factory=new_message_id)
    created_at: float = field(default_factory=time.time)
    finished: Finished | None = None
    flush_every_s: float = FLUSH_EVERY_S
    _parts: list[str] = field(default_factory=list)
    _last_write: float = field(default_factory=time.monotonic)
    _is_saved: bool = False

    async def add_text(self, text: str) -> None:
        self._parts.append(text)
        if time.monotonic() - self._last_write >= self.flush_every_s:
            try:
                await self._write()
            except StoreUnavailable:
                log.warning("reply %s: could not write what streamed so far", self.message_id)

    async def finish(self, finished: Finished) -> dict[str, Any]:
        """Record the end and store the reply; returns the fields the `done` event adds. Raises
        StoreUnavailable if the reply could not be stored."""
        self.finished = finished
        self._is_saved = True
        await self._write()
        return {
            "message_id": self.message_id,
            "dropped_turns": self.dropped_turns,
            "conversation_id": self.conversation_id,
        }

    @property
    def text(self) -> str:
        return self.finished.text if self.finished is not None else "".join(self._parts)

    def turn(self) -> Turn:
        done = self.finished
        return Turn(
            "assistant",
            self.text,
            message_id=self.message_id,
            created_at=self.created_at,
            interrupted=done is None or done.reason not in _COMPLETE,
            finish_reason=done.reason.value if done is not None else FinishReason.ABORT.value,
            params=self.params,
        )

    async def _write(self) -> None:
        self._last_write = time.monotonic()
        await self.store.update(self.conversation_id, self.turn())

    async def save(self) -> None:
        """Store the reply as it ended (or as far as it got), unless `finish` did."""
        if not self._is_saved:
            self._is_saved = True
            await self._write()


class ChatService:
    """Conversations over a ChatQueue and a HistoryStore."""

    def __init__(
        self,
        chat_queue: QueueService,
        store: HistoryStore,
        *,
        system_prompt: str | None = None,
    ) -> None:
        self.chat_queue = chat_queue
        self.store = store
        self.system_prompt = system_prompt

    async def start(
        self,
        conversation_id: str,
        message: str | None,
        params: ChatParams,
        *,
        user: str = "",
        priority: int = 0,
        max_queue_per_user: int | None = None,
        cap_key: str | None = None,
        regenerate: bool = False,
    ) -> Reply:
        """Admit a reply to `message` (or, with `regenerate`, a new reply to the last user
        message). Raises what admission raises (QueueFull, PromptTooLong, ...) with the history
        untouched. `user`, `priority`, `max_queue_per_user` and `cap_key` go to the queue as
        `ChatQueue.submit` takes them."""
        history = await self.store.turns(conversation_id)
        new_turn: Turn | None = None
        if regenerate:
            users = [i for i, t in enumerate(history) if t.role == "user"]
            if not users:
                raise InvalidRequest("There is no message to regenerate a reply to.")
            prompt_turns = history[: users[-1] + 1]
        else:
            if not message:
                raise InvalidRequest("The message is empty.", param="message")
            new_turn = Turn("user", message)
            prompt_turns = [*history, new_turn]
        cq = self.chat_queue
        budget = cq.token_budget
        room = budget.chat_reply_tokens(params.max_tokens)
        fitted = await fit_history(
            prompt_turns,
            system=self.system_prompt,
            encode=cq.encode,
            budget=budget.sequence_limit - room,
        )
        sampling = dataclasses.replace(params.sampling_params(), max_tokens=room)
        stream = await cq.submit(
            fitted.messages,
            sampling,
            user=user,
            priority=priority,
            max_queue_per_user=max_queue_per_user,
            cap_key=cap_key,
        )
        reply = Reply(conversation_id, stream, params, fitted.dropped_turns, self.store)
        try:
            # Admitted: only now change the history, so a refused request leaves it as it was.
            # NOTE: the reply goes in with its question, in one write: the history never holds
            # a user message with no reply after it, whenever the server dies.
            if new_turn is None:
                await self.store.append(conversation_id, reply.turn(), keep=len(prompt_turns))
            else:
                await self.store.append(conversation_id, new_turn, reply.turn())
        except BaseException:
            await stream.aclose()
            raise
        return reply
