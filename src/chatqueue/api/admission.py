"""How many tokens a request may use: the prompt and the reply, within the model's context window
and the server's caps. Every rule on token counts, and the chat's reply-length policy, live here;
the scheduler's `check_room` is the one rule on queue places."""

from __future__ import annotations

from dataclasses import dataclass

from chatqueue.errors import InvalidRequest, PromptTooLong

DEFAULT_CHAT_REPLY_TOKENS = 512


@dataclass(frozen=True, slots=True)
class TokenBudget:
    context_window: int
    max_prompt_tokens: int | None = None  # the server's cap on a prompt
    max_tokens_cap: int | None = None  # the server's cap on max_tokens
    default_chat_reply_tokens: int = DEFAULT_CHAT_REPLY_TOKENS
    kv_capacity_tokens: int | None = None  # the whole KV pool, when the runner has one

    def check_prompt(self, num_prompt: int) -> None:
        if self.max_prompt_tokens is not None and num_prompt > self.max_prompt_tokens:
            raise InvalidRequest(
                f"The prompt is {num_prompt} tokens; this server takes at most "
                f"{self.max_prompt_tokens}.",
                param="messages",
            )

    def max_new_tokens(self, num_prompt: int, requested: int | None) -> int:
        """The reply's length limit: `requested` (max_tokens) if the server allows it and the
        context has room, else, when not given, what the context and the cap leave."""
        cap = self.max_tokens_cap
        if cap is not None and requested is not None and requested > cap:
            raise InvalidRequest(
                f"max_tokens is {requested}; this server allows at most {cap}.",
                param="max_tokens",
            )
        room = self.context_window - num_prompt
        wanted = requested if requested is not None else min(room, cap or room)
        if wanted < 1 or num_prompt + wanted > self.context_window:
            raise PromptTooLong(
                prompt_tokens=num_prompt,
                max_tokens=max(wanted, 1),
                context_window=self.context_window,
            )
        if self.kv_capacity_tokens is not None:
            return self._within_kv(num_prompt, wanted, given=requested is not None)
        return wanted

    def _within_kv(self, num_prompt: int, wanted: int, *, given: bool) -> int:
        """A sequence that could never hold its KV even with the whole pool to itself is refused;
        an unset max_tokens shrinks to what the pool holds."""
        pool = self.kv_capacity_tokens
        assert pool is not None
        if not given:
            wanted = min(wanted, pool - num_prompt)
        if wanted < 1 or num_prompt + wanted > pool:
            raise InvalidRequest(
                f"The prompt ({num_prompt} tokens) and max_tokens ({max(wanted, 1)}) need "
                f"{num_prompt + max(wanted, 1)} tokens of KV cache; this server's whole cache "
                f"holds {pool}. Shorten the prompt or lower max_tokens.",
                param="max_tokens" if given and num_prompt < pool else "messages",
            )
        return wanted

    @property
    def sequence_limit(self) -> int:
        """The most tokens one sequence may hold here: the context window, or the whole KV
        pool when that is smaller."""
        pool = self.kv_capacity_tokens
        return self.context_window if pool is None else min(self.context_window, pool)

    def chat_reply_tokens(self, chosen: int | None) -> int:
        """A chat reply's max_tokens, kept free when the history is fitted: the one the session
        chose, else the default within a quarter of the context (or KV pool) and the server's
        cap."""
        if chosen is not None:
            return chosen
        return self._capped(min(self.default_chat_reply_tokens, max(self.sequence_limit // 4, 1)))

    @property
    def most_chat_reply_tokens(self) -> int:
        """The most a chat session may choose: half the context (the other half is for the
        history), within the server's cap."""
        return self._capped(max(self.sequence_limit // 2, 1))

    def _capped(self, n: int) -> int:
        return min(n, self.max_tokens_cap) if self.max_tokens_cap is not None else n
