"""How many prompt tokens a step may take while other streams decode.

A step runs the running streams' decode rows and some prompt tokens together, so a long prompt
makes every stream wait for its chunk. `--prefill-chunk` caps the tokens a step; on a CPU even a
few hundred prompt tokens cost many decode steps (prefill is compute-bound there), so a fixed cap
that suits a GPU stalls streams for seconds. `PrefillBudget` learns, from the runner's own step
times, what a decode step costs and what each prompt token adds, and while streams decode gives a
step only as many prompt tokens as keep it within `stall_limit` decode steps. With nothing
decoding, or before anything is measured, a step takes the whole `--prefill-chunk`.
"""

from __future__ import annotations

from dataclasses import dataclass

# NOTE: the fewest prompt tokens a step takes, whatever the timing: a prompt always advances,
# and per-step costs (a forward's fixed overhead) are spread over enough tokens to be worth it.
MIN_TOKENS = 16
# Mixed steps with fewer prompt tokens than this say little of what a token costs (timer noise).
_MIN_SAMPLE_TOKENS = 8
_SMOOTHING = 0.2  # exponential moving averages: a new step's weight


@dataclass(slots=True)
class PrefillBudget:
    """`most`: `--prefill-chunk`. `stall_limit`: the longest a step with prompt tokens may take,
    in decode steps (None: no limit but `most`)."""

    most: int
    stall_limit: float | None
    decode_s: float | None = None  # a decode-only step, smoothed
    token_s: float | None = None  # what one prompt token adds to a step, smoothed

    def tokens(self, *, decoding: bool) -> int:
        """This step's prompt tokens at most."""
        if not decoding or self.stall_limit is None:
            return self.most
        if self.decode_s is None or self.token_s is None:
            return self.most
        spare_s = (self.stall_limit - 1.0) * self.decode_s
        fits = int(spare_s / self.token_s) if self.token_s > 0 else self.most
        return max(min(self.most, MIN_TOKENS), min(self.most, fits))

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None:
        """A step's time, with how many decode rows and prompt tokens it ran."""
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = _smooth(self.decode_s, seconds)
            return
        if self.decode_s is None or prompt_tokens < _MIN_SAMPLE_TOKENS:
            return
        base_s = self.decode_s if decode_rows else 0.0
        self.token_s = _smooth(self.token_s, max(seconds - base_s, 0.0) / prompt_tokens)

    def describe(self) -> dict[str, float | int | None]:
        return {
            "most": self.most,
            "stall_limit": self.stall_limit,
            "decode_ms": None if self.decode_s is None else round(self.decode_s * 1e3, 3),
            "prompt_token_ms": None if self.token_s is None else round(self.token_s * 1e3, 4),
        }


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else old + _SMOOTHING * (new - old)
