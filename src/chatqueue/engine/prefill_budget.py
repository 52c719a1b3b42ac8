"""How many prompt tokens a step may take while other streams decode.

A step runs the running streams' decode rows and some prompt tokens together, so a long prompt
makes every stream wait for its chunk. `--prefill-chunk` caps the tokens a step; on a CPU even a
few hundred prompt tokens cost many decode steps (prefill is compute-bound there), so a fixed cap
that suits a GPU stalls streams for seconds. `PrefillBudget` learns, from the runner's own step
times, what a decode step costs and what prompt tokens add (a fixed cost for a step that has any,
and a cost a token, fitted over steps of different sizes), and while streams decode gives a step
only as many prompt tokens as keep it within `stall_limit` decode steps. With nothing decoding,
a step takes the whole `--prefill-chunk`. While streams decode and what a decode step or a prompt
token costs is not known yet, a step takes `MIN_TOKENS`, to learn it: a step of prompt tokens
alone teaches what they cost, and the first step of both then teaches the decode step's cost
(the rest of its time), so that the budget holds from the second step beside decode on. NOTE:
before, it took the whole chunk until a step of decode alone was measured, which never comes
while prompts keep arriving: on a CPU (llama.cpp, 6 ms a prompt token) every stream stalled 3 s
at each 512-token chunk, 16x its usual gap, through the first turns of 8 chats.

NOTE: why a fixed cost. Where a step with prompt tokens runs eager beside a decode step that is
a CUDA graph (the paged runner on a GPU where its packed step cannot run: the model's own
forward after the graphed decode), its kernel launches cost the same for one token as for
hundreds, and many times a graphed decode step of a 1B model (2 ms on an H100). Read as a cost
a token, that makes every prompt token look dear, and prompts would go through `MIN_TOKENS` a
step. Where the fixed cost takes more than half the spare the limit leaves (or all of it: then
no number of tokens keeps the limit), a step takes as many tokens as cost that fixed cost (the
stall at most twice what a step with any prompt token costs anyway), so that where tokens are
cheap (that GPU) hundreds go a step, and where they are dear they still go a few at a time.
NOTE: before, a step took only what the spare left past the fixed cost until the fixed cost
passed the spare, a cliff: with a 1.6 ms decode step, 4 us a token and 1.5 ms fixed, 25 tokens a
step; at 1.7 ms fixed, the whole chunk. On an H100 under 64 multi-turn chats (a limit of 2 or
3) the turns' time to first token rose from 20 ms to 1.6-2 s (p50): too few tokens a step for
the turns arriving, so they queued. NOTE: not the whole chunk regardless: a fit over a few noisy
steps can read a fixed cost into a machine whose prompt tokens cost only by their number
(llama.cpp on a CPU: 6 ms a token, none fixed, a decode step of 4 rows 36 ms; a fit read 40-88 ms
fixed from a 16-token step that ran slow), and the whole chunk there was 512 tokens, a 3 s stall
of every stream.

NOTE: why the bound gives way where more prompts wait than streams decode. A step's prompt time
stalls each of the D decoding streams by that much, and brings each of the W admitted prompts
still waiting for their first token nearer by as much (prefill goes oldest first, and each step
a prompt waits through costs it a decode step too). Where W > D (a burst of arrivals: 256
requests at once, the first few decoding), holding every step to the limit trades the waiting
many's time for the decoding few's gaps, and the batch fills slowly: on an H100, 256 requests
arriving together spent 1.5 s of a 2.1 s run in 349 steps of some 190 prompt tokens each. So the
prompt time a step may add, (limit - 1) decode steps, grows by W / D where W > D; where streams
decode and few prompts wait (a chat server's steady state), the limit holds as set.
"""

from __future__ import annotations

from dataclasses import dataclass

# NOTE: the fewest prompt tokens a step takes, whatever the timing: a prompt always advances,
# and per-step costs (a forward's fixed overhead) are spread over enough tokens to be worth it.
MIN_TOKENS = 16
# Mixed steps with fewer prompt tokens than this say little of what a token costs (timer noise).
_MIN_SAMPLE_TOKENS = 8
_SMOOTHING = 0.2  # exponential moving averages: a new step's weight
# A fit needs the steps' prompt tokens to vary by this much (standard deviation ÷ mean).
_VARIED = 0.1
# NOTE: a step with prompt tokens that took more than this many times what the fit predicts for
# it (or than steps' prompt tokens have added lately, where that is more) is left out, unless
# the step before was as slow. One slow step (a compile for a new shape, a page fault,
# another process) would otherwise weigh on many later steps' tokens: on an H100, 64 requests
# arriving together, the next 13 steps beside 2-7 decoding streams took 20-60 tokens each where
# the burst allowed whole chunks (their grants read as ~0.8 ms a token; the run's first step, a
# new packed shape, is the likely cause). A machine that really slows is followed from its
# second slow step.
_OUTLIER = 4.0


@dataclass(slots=True)
class PrefillBudget:
    """`most`: `--prefill-chunk`. `stall_limit`: the longest a step with prompt tokens may take,
    in decode steps (None: no limit but `most`)."""

    most: int
    stall_limit: float | None
    decode_s: float | None = None  # a decode-only step, smoothed
    # moments of (prompt tokens n, seconds t they added to a step), smoothed: n, t, n*n, n*t
    _moments: tuple[float, float, float, float] | None = None
    _fixed_s: float = 0.0
    _token_s: float | None = None
    _slow: bool = False  # the last step with prompt tokens was far slower than usual

    @property
    def token_s(self) -> float | None:
        """What one more prompt token adds to a step."""
        return self._token_s

    @property
    def fixed_s(self) -> float | None:
        """What a step's prompt tokens cost beyond their number (a forward of their own)."""
        return None if self._token_s is None else self._fixed_s

    def tokens(self, *, decoding: int, waiting: int) -> int:
        """This step's prompt tokens at most, with `decoding` streams decoding and `waiting`
        prompts admitted that have no first token yet."""
        if not decoding or self.stall_limit is None:
            return self.most
        if self.decode_s is None or self._token_s is None:  # not known yet: a few, to learn
            return min(self.most, MIN_TOKENS)
        fixed_s, token_s = self._fixed_s, self._token_s
        many = max(1.0, waiting / decoding)  # the waiting many outweigh the decoding few
        # the prompt time a step may add, its fixed cost included; at least twice that cost,
        # which any prompt token brings
        spare_s = max((self.stall_limit - 1.0) * self.decode_s * many, 2 * fixed_s) - fixed_s
        fits = int(spare_s / token_s) if token_s > 0 else self.most
        return max(min(self.most, MIN_TOKENS), min(self.most, fits))

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None:
        """A step's time, with how many decode rows and prompt tokens it ran."""
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = _smooth(self.decode_s, seconds)
            return
        if prompt_tokens < _MIN_SAMPLE_TOKENS:
            return
        if decode_rows and self.decode_s is None:
            if self._token_s is not None:  # the prompt tokens' part known: the rest is decode
                rest = seconds - self._fixed_s - prompt_tokens * self._token_s
                self.decode_s = rest if rest > 0 else None
            return
        base_s = self.decode_s if decode_rows and self.decode_s is not None else 0.0
        n, t = float(prompt_tokens), max(seconds - base_s, 0.0)
        if self._moments is not None and self._token_s is not None:
            usual = max(self._fixed_s + n * self._token_s, self._moments[1])
            slow, slow_before = t > _OUTLIER * usual, self._slow
            self._slow = slow
            if slow and not slow_before:  # one alone is left out; from two in a row on, they count
                return
        sample = (n, t, n * n, n * t)
        old = self._moments
        self._moments = (
            sample
            if old is None
            else tuple(o + _SMOOTHING * (x - o) for o, x in zip(old, sample, strict=True))  # type: ignore[assignment]
        )
        self._fit()

    def _fit(self) -> None:
        """(fixed, per token) seconds: a least-squares line through the smoothed samples; where
        their sizes hardly vary, a cost a token alone."""
        assert self._moments is not None
        n, t, nn, nt = self._moments
        variance = nn - n * n
        if variance > (_VARIED * n) ** 2:
            slope = (nt - n * t) / variance
            if slope > 0:
                self._fixed_s, self._token_s = max(t - slope * n, 0.0), slope
                return
        self._fixed_s, self._token_s = 0.0, t / n

    def describe(self) -> dict[str, float | int | None]:
        return {
            "most": self.most,
            "stall_limit": self.stall_limit,
            "decode_ms": None if self.decode_s is None else round(self.decode_s * 1e3, 3),
            "prompt_token_ms": None if self.token_s is None else round(self.token_s * 1e3, 4),
            "prompt_fixed_ms": None if self.fixed_s is None else round(self.fixed_s * 1e3, 3),
        }


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else old + _SMOOTHING * (new - old)
