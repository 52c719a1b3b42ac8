"""One reply in a conversation: read the history, fit it to the context, submit, and record the
reply (complete or interrupted) when it ends. Used by the chat routes and the console chat."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from chatqueue.api import ChatQueue, RequestStream
from chatqueue.chat.window import fit_history
from chatqueue.errors import InvalidRequest
from chatqueue.history import HistoryStore
from chatqueue.history.types import ChatParams, Turn, new_message_id
from chatqueue.types import Finished, FinishReason

_COMPLETE = (FinishReason.STOP, FinishReason.LENGTH)


@dataclass
class Reply:
    """An assistant reply being generated. Feed it the streamed text (`add_text`) and the finish
    (`finish`); `save` then records it, and records what was streamed if it never finished."""

    conversation_id: str
    stream: RequestStream
    params: ChatParams
    dropped_turns: int
    store: HistoryStore
    message_id: str = field(default_factory=new_message_id)
    finished: Finished | None = None
    _parts: list[str] = field(default_factory=list)
    _is_saved: bool = False

    def add_text(self, text: str) -> None:
        self._parts.append(text)

    def finish(self, finished: Finished) -> dict[str, Any]:
        """Record the end; returns the fields the `done` event adds."""
        self.finished = finished
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
            interrupted=done is None or done.reason not in _COMPLETE,
            finish_reason=done.reason.value if done is not None else FinishReason.ABORT.value,
            params=self.params,
        )

    async def save(self) -> None:
        if not self._is_saved:
            self._is_saved = True
            await self.store.append(self.conversation_id, self.turn())


class ChatService:
    """Conversations over a ChatQueue and a HistoryStore."""

    def __init__(
        self,
        chat_queue: ChatQueue,
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
        regenerate: bool = False,
    ) -> Reply:
        """Admit a reply to `message` (or, with `regenerate`, a new reply to the last user
        message). Raises what admission raises (QueueFull, PromptTooLong, ...) with the history
        untouched."""
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
        room = cq.token_budget.chat_reply_tokens(params.max_tokens)
        fitted = await fit_history(
            prompt_turns,
            system=self.system_prompt,
            encode=cq.encode,
            budget=cq.context_window - room,
        )
        sampling = dataclasses.replace(params.sampling_params(), max_tokens=room)
        stream = await cq.submit(fitted.messages, sampling, user=user)
        try:
            # Admitted: only now change the history, so a refused request leaves it as it was.
            if new_turn is None:
                await self.store.truncate(conversation_id, len(prompt_turns))
            else:
                await self.store.append(conversation_id, new_turn)
        except BaseException:
            await stream.aclose()
            raise
        return Reply(conversation_id, stream, params, fitted.dropped_turns, self.store)
