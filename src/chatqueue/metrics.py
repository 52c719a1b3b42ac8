"""Figures the server reports: Prometheus metrics and the rolling numbers behind /load."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Exposed(Protocol):
    """What /metrics renders: a queue's `Metrics`, or an API server's view of the core's."""

    @property
    def registry(self) -> CollectorRegistry: ...

    async def refresh(self) -> None:
        """Bring the registry up to date before it is rendered."""


class KVFigures(Protocol):
    """What a KV pool reports (the scheduler's BlockManager)."""

    @property
    def num_used_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def hit_rate(self) -> float | None: ...


class _Window:
    """Sum and count of (time, value) samples over the last `window_s` seconds. Thread-safe.
    The sum is kept as samples come and go, so reading it costs the same at any rate."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append((self._clock(), value))
            self._sum += value
            self._trim()  # NOTE: here too: a server nobody polls for /load must not grow

    def _trim(self) -> None:
        horizon = self._clock() - self._window_s
        samples = self._samples
        while samples and samples[0][0] < horizon:
            self._sum -= samples.popleft()[1]
        if not samples:
            self._sum = 0.0  # no rounding left over from what went

    def per_second(self) -> float:
        with self._lock:
            self._trim()
            return self._sum / self._window_s

    def mean(self) -> float | None:
        with self._lock:
            self._trim()
            n = len(self._samples)
            return self._sum / n if n else None


class Metrics:
    """Owns one Prometheus registry per queue, so several queues (or tests) never collide."""

    def __init__(self, *, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("chatqueue_running_requests", "Requests generating now", registry=r)
        self.waiting = Gauge("chatqueue_waiting_requests", "Requests in the queue", registry=r)
        self.rejected = Counter(
            "chatqueue_rejected_requests", "Requests refused at admission", ["reason"], registry=r
        )
        self.finished = Counter(
            "chatqueue_finished_requests",
            "Requests ended, by finish reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("chatqueue_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter(
            "chatqueue_generated_tokens", "Tokens generated", registry=r
        )
        self.queue_wait = Histogram(
            "chatqueue_queue_wait_seconds",
            "Time from arrival to a slot",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "chatqueue_time_to_first_token_seconds",
            "Time from arrival to the first token",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.steps = Counter("chatqueue_engine_steps", "Engine steps run", registry=r)
        self.steps_overlapped = Gauge(
            "chatqueue_steps_overlapped",
            "1 while the engine keeps a step in flight (--overlap-steps), else 0",
            registry=r,
        )
        self.model_restarts = Counter(
            "chatqueue_model_restarts", "Times the model process was started again", registry=r
        )
        self.model_exits = Counter(
            "chatqueue_model_exits",
            "Times the model process went away, by why (killed by SIGKILL, exit code 1, ...)",
            ["reason"],
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "chatqueue_cached_prompt_tokens",
            "Prompt tokens whose KV was found in the prefix cache (not computed)",
            registry=r,
        )
        self.preemptions = Counter(
            "chatqueue_preemptions",
            "Running requests put back in the queue for want of KV blocks, to resume later",
            registry=r,
        )
        self.kv_blocks_used = Gauge(
            "chatqueue_kv_blocks_used", "KV cache blocks held by requests", registry=r
        )
        self.kv_blocks_free = Gauge(
            "chatqueue_kv_blocks_free",
            "KV cache blocks no request holds (cached prefixes among them)",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "chatqueue_prefix_cache_hit_rate",
            "Share of the tokens allocated so far whose KV was found cached",
            registry=r,
        )
        self.loop_lag = Histogram(
            "chatqueue_event_loop_lag_seconds",
            "How late a timer on the event loop fired (sampled every 100 ms)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self._tokens = _Window(window_s, clock)
        self._waits = _Window(window_s * 6, clock)
        self._prompt_total = self._cached_total = 0  # for a runner's own prefix reuse
        self._pool_rate = False  # the hit rate is a KV pool's (observe_kv)

    async def refresh(self) -> None:
        """Nothing to do: this process's metrics are always up to date."""

    def observe_kv(self, kv: KVFigures | None) -> None:
        if kv is not None:
            self._pool_rate = True
            self.kv_blocks_used.set(kv.num_used_blocks)
            self.kv_blocks_free.set(kv.num_free_blocks)
            self.prefix_hit_rate.set(kv.hit_rate or 0.0)

    def observe_prompt(self, tokens: int, cached: int) -> None:
        """A request started: its prompt tokens, and those a KV pool found cached."""
        self.prompt_tokens.inc(tokens)
        self._prompt_total += tokens
        self.observe_cached(cached)

    def observe_cached(self, tokens: int) -> None:
        """Prompt tokens found cached: a pool's at admission, or a runner's own as it joined
        (llama.cpp's slots). Without a pool, the hit rate is these over the prompt tokens."""
        self.cached_prompt_tokens.inc(tokens)
        self._cached_total += tokens
        if not self._pool_rate and self._prompt_total:
            self.prefix_hit_rate.set(self.cached_share or 0.0)

    @property
    def cached_share(self) -> float | None:
        """Prompt tokens found cached ÷ prompt tokens of the requests started, so far."""
        return self._cached_total / self._prompt_total if self._prompt_total else None

    def observe_tokens(self, n: int) -> None:
        self.generated_tokens.inc(n)
        self._tokens.add(n)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)
        self._waits.add(seconds)

    @property
    def tokens_per_s(self) -> float:
        return self._tokens.per_second()

    @property
    def mean_queue_wait_s(self) -> float | None:
        return self._waits.mean()
