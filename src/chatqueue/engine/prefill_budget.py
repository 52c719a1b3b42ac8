"""How many prompt tokens a step may take while other streams decode.

A step runs the running streams' decode rows and some prompt tokens together, so a long prompt
makes every stream wait for its chunk. `--prefill-chunk` caps the tokens a step; on a CPU even a
few hundred prompt tokens cost many decode steps (prefill is compute-bound there), so a fixed cap
that suits a GPU stalls streams for seconds. `PrefillBudget` learns, from the runner's own step
times, what a decode step costs and what prompt tokens add (a fixed cost for a step that has any,
and a cost a token, fitted over steps of different sizes), and while streams decode gives a step
only as many prompt tokens as keep it within `stall_limit` decode steps. With nothing decoding,
a step takes the whole `--prefill-chunk`. While streams decode and what a decode step costs is
not known yet, a step decodes alone, to learn it; while what a prompt token costs is not, a step
takes `MIN_TOKENS`. NOTE: before, the first step beside decode taught the decode step's cost (its
time less what its prompt tokens were thought to cost), which a wrong thought ruined for good:
on an H100 the server's first step (465 prompt tokens alone, a warm-up) took 568 ms, read as
1.2 ms a token, so no step beside decode ever seemed to leave any time for decode, the decode
step was never learned (no step decodes alone while prompts keep arriving), every step took
`MIN_TOKENS`, and 64 multi-turn chats' turns waited 1.7 s for their first token. And before that,
it took the whole chunk until a step of decode alone was measured: on a CPU (llama.cpp, 6 ms a
prompt token) every stream stalled 3 s at each 512-token chunk through the first turns of 8
chats.

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

NOTE: why the fit is kept by size of step, a step of another size taken while it has seen one, a
decode step far slower than usual left out, and the fit started over where steps leave it. Beside
decode each step takes about what it was granted, so a mean over recent steps soon holds one size,
which cannot tell a fixed cost from a cost a token; read as a cost a token alone, the fixed cost
lands on the few tokens of each step and keeps the grants that few (on an H100's costs, 1.5 ms fixed
and 4 us a token: 16 tokens read as 98 us each). A decode step that ran slow for reasons of its own
(a page fault, another process) raised the learned decode step, so steps beside decode read their
prompt tokens cheaper than they were, the fit's slope turned negative, and again a cost a token
alone. Both ended, in a simulation of 64 chats on an H100's costs
(`benchmarks/sim_prefill_budget.py`), at 16 tokens a step and turns queueing for their first token.
Now each size's smoothed step (by powers of two) is kept until that size comes again or `_FORGET`
steps pass, the line through them is Theil-Sen's (the median slope between sizes: one size's stray
point moves it little), and where the fit has one size only (or no rising slope) a step takes twice
its grant, to learn another. Two steps in a row whose prompt tokens took more than `_OFF` times what
the fit predicts, or less than its inverse, mean the machine changed or what was learned was wrong
(the warm-up above): the sizes seen are forgotten and the fit starts over from the steps that
follow.

NOTE: why a decode step's cost is kept by its rows. A decode step of 150 rows costs more than one
of 8 (on an H100, 2.2 against 1.6 ms), and while a burst arrives almost no step decodes alone, so
one smoothed decode step stayed what the warm-up's few rows cost: each step beside the grown
batch read the batch's own extra decode time as its prompt tokens' cost, and the spare a step
was left was a small batch's. In simulation on an H100's costs, 256 requests after a warm-up and
64 together ran 1.08-1.30x the time they take with no limit (1.00-1.01x now). So each batch size
(by powers of two of its rows) keeps its smoothed decode step, and a line through them (Theil-Sen,
never falling with rows) gives the decode step at any number of rows. NOTE: and where streams
decode in more rows than any decode step alone has run (a power of two of rows above every one
seen), a step decodes alone first, to learn it (a step like any other for the streams: each makes
its token). A GPU's decode step costs about the same up to some rows (the weights' read) and grows
past them (an H100's: ~1.9 ms flat to 64 rows, then ~7 us a row), so no line through the steps of
a warm-up's 64 rows foretells 200: on that H100, 256 requests after 64 together ran 1.19x the time
they took with no limit, granted 268-380 tokens a step where 512 kept the limit (in simulation,
`sim_prefill_budget.py --knee --burst 256 --after`, 1.09-1.24x; 1.00x now).

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

import statistics
from dataclasses import dataclass, field

# NOTE: the fewest prompt tokens a step takes, whatever the timing: a prompt always advances,
# and per-step costs (a forward's fixed overhead) are spread over enough tokens to be worth it.
MIN_TOKENS = 16
# Mixed steps with fewer prompt tokens than this say little of what a token costs (timer noise).
_MIN_SAMPLE_TOKENS = 8
_SMOOTHING = 0.2  # exponential moving averages: a new step's weight
# Two sizes of step give a slope where one has this much more prompt tokens than the other.
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
# A step whose prompt tokens took more than this many times what the fit predicts, or less than
# its inverse, is off the fit; two in a row start it over from the steps that follow.
_OFF = 2.0
# A size of step not seen in this many steps with prompt tokens is forgotten: old enough to keep
# the line's slope through a while of steps of one size, young enough to follow the machine.
_FORGET = 256


@dataclass(slots=True)
class PrefillBudget:
    """`most`: `--prefill-chunk`. `stall_limit`: the longest a step with prompt tokens may take,
    in decode steps (None: no limit but `most`)."""

    most: int
    stall_limit: float | None
    # a decode step alone, smoothed for each size of batch (by powers of two of its rows): (rows,
    # seconds, when), the decode steps alone counted, and the line through them (fixed, a row)
    _decodes: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    _decode_steps: int = 0
    _decode_line: tuple[float, float, float] | None = None  # and the cheapest size's
    _last_rows: int = 0
    # (prompt tokens n, seconds t they added to a step, when) smoothed for each size of step
    # (by powers of two), and the steps with prompt tokens counted
    _sizes: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    _steps: int = 0
    _recent_s: float | None = None  # the seconds steps' prompt tokens added, smoothed
    _fixed_s: float = 0.0
    _token_s: float | None = None
    _slow: bool = False  # the last step with prompt tokens was far slower than usual
    _slow_decode: bool = False  # the last decode step alone was
    _off: bool = False  # the last step with prompt tokens was not what the fit predicts
    _split: bool = False  # the fit tells a fixed cost from a cost a token (steps of two sizes)

    @property
    def decode_s(self) -> float | None:
        """A decode step alone, at the rows the last one ran."""
        return self.decode_at(self._last_rows)

    def decode_at(self, rows: int) -> float | None:
        """What a decode step alone of `rows` rows costs: the line through each batch size's
        smoothed step (Theil-Sen, as the prompt tokens' fit; never falling with rows, nor below
        the cheapest size's), or the one size seen. None before any."""
        if self._decode_line is None:
            return None
        fixed, per_row, least = self._decode_line
        return max(fixed + per_row * rows, least)

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
        decode_s = self.decode_at(decoding)
        if decode_s is None or _size(decoding) > max(self._decodes):
            return 0  # a step of decode alone, to learn what one costs (at this many rows)
        if self._token_s is None:  # not known yet: a few, to learn
            return min(self.most, MIN_TOKENS)
        fixed_s, token_s = self._fixed_s, self._token_s
        many = max(1.0, waiting / decoding)  # the waiting many outweigh the decoding few
        # the prompt time a step may add, its fixed cost included; at least twice that cost,
        # which any prompt token brings
        spare_s = max((self.stall_limit - 1.0) * decode_s * many, 2 * fixed_s) - fixed_s
        fits = int(spare_s / token_s) if token_s > 0 else self.most
        if not self._split:  # steps of one size so far: one of another, to split the costs
            fits = max(2 * fits, 2 * MIN_TOKENS)
        return max(min(self.most, MIN_TOKENS), min(self.most, fits))

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None:
        """A step's time, with how many decode rows and prompt tokens it ran."""
        if prompt_tokens == 0:
            if decode_rows:
                usual = self.decode_at(decode_rows)
                slow, slow_before = self._far_slower(seconds, usual), self._slow_decode
                self._slow_decode = slow
                if not slow or slow_before:  # one alone is left out, as for prompt steps
                    self._observe_decode(seconds, decode_rows)
            return
        decode_s = self.decode_at(decode_rows)
        if prompt_tokens < _MIN_SAMPLE_TOKENS or (decode_rows and decode_s is None):
            return  # too few to say what they cost; or beside a decode step of unknown cost
        # what the prompt tokens added: a step of prompts alone streams the weights too
        n, t = float(prompt_tokens), max(seconds - (decode_s or 0.0), 0.0)
        if self._recent_s is not None and self._token_s is not None:
            predicted = self._fixed_s + n * self._token_s
            usual = max(predicted, self._recent_s)
            slow, slow_before = self._far_slower(t, usual), self._slow
            self._slow = slow
            if slow and not slow_before:  # one alone is left out; from two in a row on, they count
                return
            off, off_before = not predicted / _OFF <= t <= predicted * _OFF, self._off
            self._off = off
            # two steps in a row that the fit does not predict: the machine changed, or what was
            # learned was wrong (a warm-up); what the other sizes cost tells nothing now
            if off and off_before:
                self._sizes.clear()
                self._recent_s = None
                self._off = False
        self._steps += 1
        self._recent_s = _smooth(self._recent_s, t)
        _smooth_into(self._sizes, n, t, self._steps)
        self._fit()

    def _observe_decode(self, seconds: float, rows: int) -> None:
        """A decode step alone into its batch size's smoothed step, and the line refitted."""
        self._decode_steps += 1
        self._last_rows = rows
        _smooth_into(self._decodes, float(rows), seconds, self._decode_steps)
        points = _points(self._decodes, self._decode_steps)
        per_row = max(_median_slope(points), 0.0)
        fixed = statistics.median(t - per_row * r for r, t in points)
        self._decode_line = (fixed, per_row, min(t for _, t in points))

    @staticmethod
    def _far_slower(seconds: float, usual: float | None) -> bool:
        return usual is not None and seconds > _OUTLIER * usual

    def _fit(self) -> None:
        """(fixed, per token) seconds: a line through each size's smoothed step (Theil-Sen: the
        median of the slopes between every two sizes, so that one size's stray point moves it
        little); with one size, or no rising slope, a cost a token alone."""
        points = _points(self._sizes, self._steps)
        slope = _median_slope(points)
        self._split = slope > 0
        if slope > 0:
            fixed = statistics.median(t - slope * n for n, t in points)
            self._fixed_s, self._token_s = max(fixed, 0.0), slope
            return
        n = statistics.fmean(n for n, _ in points)
        t = statistics.fmean(t for _, t in points)
        self._fixed_s, self._token_s = 0.0, t / n

    def describe(self) -> dict[str, float | int | None]:
        return {
            "most": self.most,
            "stall_limit": self.stall_limit,
            "decode_ms": None if self.decode_s is None else round(self.decode_s * 1e3, 3),
            "prompt_token_ms": None if self.token_s is None else round(self.token_s * 1e3, 4),
            "prompt_fixed_ms": None if self.fixed_s is None else round(self.fixed_s * 1e3, 3),
        }


def _smooth_into(sizes: dict[int, tuple[float, float, int]], x: float, t: float, now: int) -> None:
    """(x, seconds) into the smoothed point of its size, seen at `now`."""
    size = _size(x)
    old = sizes.get(size)
    sizes[size] = (x, t, now) if old is None else (_smooth(old[0], x), _smooth(old[1], t), now)


def _size(x: float) -> int:
    """The size a step is kept by: its rows' or tokens' power of two."""
    return int(x).bit_length()


def _points(sizes: dict[int, tuple[float, float, int]], now: int) -> list[tuple[float, float]]:
    """Each size's smoothed (x, seconds), sorted, the sizes not seen in `_FORGET` counts of
    `now` forgotten first."""
    for size in [s for s, (_, _, when) in sizes.items() if now - when > _FORGET]:
        del sizes[size]
    return sorted((x, t) for x, t, _ in sizes.values())


def _median_slope(points: list[tuple[float, float]]) -> float:
    """Theil-Sen's slope: the median of the slopes between every two points whose x differ by
    `_VARIED` at least (0.0 where none do)."""
    slopes = [
        (t1 - t0) / (x1 - x0)
        for i, (x0, t0) in enumerate(points)
        for x1, t1 in points[i + 1 :]
        if x1 > x0 * (1 + _VARIED)
    ]
    return statistics.median(slopes) if slopes else 0.0


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else old + _SMOOTHING * (new - old)
