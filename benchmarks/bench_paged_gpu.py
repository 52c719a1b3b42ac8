"""The paged runner on a GPU, in one run:

(a) correctness: tiny fp32 models of the families the paged pool takes, through the path the
    GPU serves (the decode step compiled by Inductor, captured as CUDA graphs, Triton
    attention through block tables; steps with prompt tokens packed through the same compiled
    layers, captured by token count, the packed Triton kernel),
    driven by the real scheduler and block manager: greedy tokens equal to `generate()` token
    for token while requests join and leave, with prefix hits, prompts in chunks beside
    decode, and preemption and resume;
(b) speed: decode ms/step of the paged runner and of the static-cache runner, side by side on
    the same shape (Llama-3.2-1B, random bf16 weights; `--shape gemma-3-1b` and others), at
    batch 1, 16 and 64, each ÷ the memory-bandwidth floor (weights + the KV a step reads, at
    the copy bandwidth measured here);
(c) throughput: 64 and 256 requests arriving together (256-token prompts, 256 new tokens),
    the static cache's runner and the pool's, each ÷ the ideal for that work (every decode
    step at the bandwidth floor, every prompt token at the bf16 matmul rate measured here);
(d) profile: 64 streams decoding while 4 new turns of 150 tokens after 1500 cached go in,
    a step alone and with the turns, and torch.profiler's table of that step.

  python benchmarks/bench_paged_gpu.py [--parts correctness,speed,throughput,profile] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, benchmarks

from benchmarks.bench_families import MODEL_CLASSES, copy_bandwidth, shaped
from benchmarks.gpu_model import llama_1b_config

from chatqueue.engine.hf.kv_batch import UnsupportedCache
from chatqueue.engine.hf.paged import HFPagedRunner, check_paged_supported
from chatqueue.engine.hf.paged.decode import DecodeOptions
from chatqueue.engine.hf.static import StaticCacheRunner
from chatqueue.engine.runner import ModelRunner, NewSequence, StepBatch
from chatqueue.types import SamplingParams
from tests.support import tiny_families
from tests.support.paged_drive import scenarios

RESULTS: dict[str, Any] = {}
PROMPT_TOKENS = 256
DECODE_STEPS = 64
# NOTE: rows prefilled in a step decode while the rest still prefill (64 prompts of 256 tokens go
# through in some 32 steps of 512): the speed part's rows are sized for that too
SPEED_LEN = PROMPT_TOKENS + DECODE_STEPS + 8 + 64
BLOCK = 16


def log(msg: str) -> None:
    print(msg, flush=True)


# -- (a) correctness ------------------------------------------------------------------------
_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def tiny_models(device: str) -> dict[str, Any]:
    """Each family's tiny model, and those with sliding windows once more without them (as
    Qwen3's and Qwen2.5's checkpoints ship)."""
    models: dict[str, Callable[[], Any]] = {}
    for family, spec in tiny_families.FAMILIES.items():
        models[family] = lambda family=family: tiny_families.tiny(family, device)
        if spec.window and not family.startswith("gemma"):
            extra = {k: v for k, v in spec.extra.items() if k not in _WINDOW_KEYS}
            extra["sliding_window"] = None

            def unwindowed(spec: Any = spec, extra: dict[str, Any] = extra) -> Any:
                torch.manual_seed(0)
                config = getattr(transformers, spec.config)(**{**tiny_families.COMMON, **extra})
                with torch.device(device):
                    return getattr(transformers, spec.model)(config).eval()

            models[f"{family} (no window)"] = unwindowed
    return models


def correctness(cache: Path, device: str, only: list[str]) -> bool:
    all_ok = True
    for family, build in tiny_models(device).items():
        if only and family.split()[0] not in only:
            continue
        # NOTE: as if each model were served by a process of its own: Dynamo would otherwise
        # see one model's constants change in the next one's trace and make them symbolic
        torch._dynamo.reset()
        model = build()
        try:
            check_paged_supported(model)
        except UnsupportedCache as exc:
            log(f"{family}: not paged ({exc}); the static runner serves it")
            continue
        options = DecodeOptions(max_batch=8, compile_cache=cache / family.replace(" ", "-"))

        def make(model: Any = model, options: DecodeOptions = options, **kw: Any) -> HFPagedRunner:
            return HFPagedRunner(model, decode=options, context_window=256, **kw)

        t0 = time.perf_counter()
        try:
            ok = scenarios(model, make)
        except Exception:
            traceback.print_exc()
            ok = {"error": False}
        RESULTS.setdefault("correctness", {})[family] = ok
        all_ok &= all(ok.values())
        log(f"{family}: {ok} ({time.perf_counter() - t0:.1f} s)")
    return all_ok


# -- (b) speed ------------------------------------------------------------------------------
def sync() -> None:
    torch.cuda.synchronize()


def prompts(n: int, longest: int, vocab: int, *, paged: bool) -> list[NewSequence]:
    """n greedy requests of PROMPT_TOKENS random ids (EOS ignored); for the paged runner each
    with blocks of its own for `longest` tokens, as the scheduler would give."""
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(n)
    width = -(-longest // BLOCK)
    return [
        NewSequence(
            i,
            torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g).tolist(),
            greedy,
            block_table=list(range(i * width, (i + 1) * width)) if paged else (),
        )
        for i in range(n)
    ]


def decode_ms(runner: ModelRunner, batch: int, vocab: int, *, paged: bool) -> float:
    """Median ms of one decode step (sampling and the token ids' transfer included) for `batch`
    running sequences of PROMPT_TOKENS prompts."""
    news = prompts(batch, SPEED_LEN, vocab, paged=paged)
    ids = [n.rid for n in news]
    got = runner.step(StepBatch(new=news, running=[], released=[])).tokens
    while len(got) < batch:
        got |= runner.step(StepBatch(new=[], running=ids, released=[])).tokens
    times = []
    for _ in range(DECODE_STEPS):
        sync()
        t0 = time.perf_counter()
        runner.step(StepBatch(new=[], running=ids, released=[]))
        times.append(time.perf_counter() - t0)
    runner.step(StepBatch(new=[], running=[], released=ids))
    return statistics.median(times[8:]) * 1e3


def floor_ms(
    model: Any, batch: int, bandwidth: float, context: float = PROMPT_TOKENS + DECODE_STEPS / 2
) -> float:
    """A decode step's floor: the weights and `context` tokens of KV a row read once."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    return (weights + batch * context * per_token) / bandwidth * 1e3


def matmul_rate() -> float:
    """bf16 FLOP/s of a large square matmul (the best a prompt token can go at)."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0)


def ideal_s(model: Any, n: int, new_tokens: int, bandwidth: float, rate: float) -> float:
    """n requests' work at the hardware's rates: each decode step at its floor (the KV read
    at the mean context), each prompt token's matmuls (2 x parameters FLOPs) at `rate`."""
    params = sum(p.numel() for p in model.parameters())
    decode = new_tokens * floor_ms(model, n, bandwidth, PROMPT_TOKENS + new_tokens / 2) / 1e3
    return decode + n * PROMPT_TOKENS * 2 * params / rate


def build_1b(shape: str = "llama-3.2-1b") -> Any:
    """Random bf16 weights in the shape of Llama-3.2-1B (or another of bench_families.py's)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        if shape != "llama-3.2-1b":
            model = getattr(transformers, MODEL_CLASSES[shape])(shaped(shape, quick=False))
            return model.to(torch.bfloat16).eval()
        return transformers.LlamaForCausalLM(llama_1b_config()).to(torch.bfloat16).eval()


def static_runner(
    model: Any, *, max_batch: int, max_len: int, cache: Path, buckets: list[int] | None
) -> StaticCacheRunner:
    """`buckets`: the batch sizes to capture (None: every one up to `max_batch`, as served)."""
    runner = StaticCacheRunner(
        model=model,
        max_batch=max_batch,
        max_len=max_len,
        use_cuda_graphs=buckets is None,
        compile_cache=cache / "static",
    )
    if buckets is not None:
        runner.graphs.buckets = buckets
        runner.graphs.capture()
        runner.slots.reset()
    return runner


def paged_runner(
    model: Any,
    *,
    max_batch: int,
    max_len: int,
    cache: Path,
    buckets: list[int] | None,
    prefill_chunk: int = 512,
    prefill_stall_limit: float | None = 2.0,  # the server's default
) -> HFPagedRunner:
    options = DecodeOptions(
        max_batch=max_batch, cuda_graphs=buckets is None, compile_cache=cache / "paged"
    )
    runner = HFPagedRunner(
        model,
        num_blocks=max_batch * -(-max_len // BLOCK),
        block_size=BLOCK,
        prefill_chunk=prefill_chunk,
        prefill_stall_limit=prefill_stall_limit,
        context_window=max_len,
        decode=options,
    )
    assert runner._decode is not None
    if buckets is not None:
        runner._decode.graphs.buckets = buckets
        runner._decode.graphs.capture()
        runner._decode.inputs.reset()
    return runner


RUNNERS: dict[str, Callable[..., Any]] = {"static": static_runner, "paged": paged_runner}


def speed(cache: Path, batches: list[int], shape: str = "llama-3.2-1b") -> None:
    bandwidth = copy_bandwidth("cuda")
    RESULTS["copy_bandwidth_GBps"] = bandwidth / 1e9
    RESULTS["speed_shape"] = shape
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; the shape of {shape}")
    max_len = SPEED_LEN
    buckets = sorted({max(2, b) for b in batches})
    for name, make in RUNNERS.items():
        torch._dynamo.reset()
        model = build_1b(shape)
        vocab = model.config.get_text_config().vocab_size
        t0 = time.perf_counter()
        # NOTE: prompts go in whole chunks here, as on the static runner: under the prefill
        # budget a model whose prompt steps cost many decode steps (Gemma-3-1B on an H100) took
        # so many steps that its first rows (likely) outgrew their tables: a device assert
        kw = {"prefill_stall_limit": None} if name == "paged" else {}
        runner = make(
            model, max_batch=max(batches), max_len=max_len, cache=cache, buckets=buckets, **kw
        )
        log(f"{name}: ready in {time.perf_counter() - t0:.1f} s: {runner.info}")
        for batch in batches:
            decode_ms(runner, batch, vocab, paged=name == "paged")  # warm
            ms = statistics.median(
                decode_ms(runner, batch, vocab, paged=name == "paged") for _ in range(3)
            )
            floor = floor_ms(model, batch, bandwidth)
            RESULTS.setdefault("speed", {}).setdefault(name, {})[batch] = {
                "ms": ms,
                "floor_ms": floor,
                "ratio": ms / floor,
            }
            log(f"{name}: batch {batch}: {ms:.3f} ms/step, floor {floor:.3f} ms, {ms / floor:.2f}x")
        runner.close()
        del runner, model
        torch.cuda.empty_cache()
    figures = RESULTS["speed"]
    for batch in batches:
        log(
            f"batch {batch}: paged ÷ static ms/step = "
            f"{figures['paged'][batch]['ms'] / figures['static'][batch]['ms']:.3f}"
        )


def arrive_together(
    runner: Any,
    n: int,
    new_tokens: int,
    vocab: int,
    *,
    paged: bool,
    steps: list[tuple[bool, int, float]] | None = None,
) -> float:
    """n requests at once (PROMPT_TOKENS-token prompts), each released after `new_tokens`
    tokens, stepped as the engine steps: seconds until the last is done. `steps` gets each
    step's (a prompt still waiting or in chunks, rows that sampled a token, seconds)."""
    news = prompts(n, PROMPT_TOKENS + new_tokens, vocab, paged=paged)
    counts = dict.fromkeys(range(n), 0)
    released: list[int] = []
    sync()
    t0 = time.perf_counter()
    batch = StepBatch(new=news, running=[], released=[])
    while counts:
        started = time.perf_counter()
        prompting = any(count == 0 for count in counts.values())
        tokens = runner.step(batch).tokens
        if steps is not None:
            steps.append((prompting, len(tokens), time.perf_counter() - started))
        released = []
        for rid in tokens:
            counts[rid] += 1
            if counts[rid] == new_tokens:
                released.append(rid)
                del counts[rid]
        batch = StepBatch(new=[], running=sorted(counts), released=released)
    runner.step(batch)
    sync()
    return time.perf_counter() - t0


def prefill_ms(runner: Any, tokens: int, vocab: int, *, paged: bool) -> float:
    """One prompt of `tokens` alone through a step (nothing decoding): median ms of 5."""
    times = []
    for i in range(6):
        prompt = torch.randint(3, vocab, (tokens,)).tolist()
        table = list(range(-(-tokens // BLOCK))) if paged else ()
        new = NewSequence(10_000 + i, prompt, SamplingParams(temperature=0), block_table=table)
        sync()
        t0 = time.perf_counter()
        runner.step(StepBatch(new=[new], running=[], released=[]))
        sync()
        times.append(time.perf_counter() - t0)
        runner.step(StepBatch(new=[], running=[], released=[new.rid]))
    return statistics.median(times[1:]) * 1e3


def where_time_went(
    steps: list[tuple[bool, int, float]],
    model: Any,
    n: int,
    new_tokens: int,
    bandwidth: float,
    rate: float,
) -> str:
    """The run's steps in two parts: those while a prompt still waited or went in chunks
    (against all the prompts' matmuls at `rate`) and the decode steps after (against their
    floors), and the time between steps (the benchmark's own host work)."""
    params = sum(p.numel() for p in model.parameters())
    prompting = [s for p, _, s in steps if p]
    decoding = [(rows, s) for p, rows, s in steps if not p]
    context = PROMPT_TOKENS + new_tokens / 2
    floors = sum(floor_ms(model, rows, bandwidth, context) for rows, _ in decoding) / 1e3
    full = [s * 1e3 for rows, s in decoding if rows == n]
    # decode steps right after sequences ended (fewer rows than the step before) and the rest
    after, rest = [], []
    for (_, before, _), (prompted, rows, s) in itertools.pairwise(steps):
        if not prompted:
            (after if rows < before else rest).append(s * 1e3)
    return (
        f"{len(prompting)} steps with prompts {sum(prompting):.3f} s (all prompts' matmuls "
        f"{n * PROMPT_TOKENS * 2 * params / rate:.3f} s); {len(decoding)} decode steps "
        f"{sum(s for _, s in decoding):.3f} s (floors {floors:.3f} s; at batch {n} median "
        f"{statistics.median(full) if full else float('nan'):.2f} ms, floor "
        f"{floor_ms(model, n, bandwidth, context):.2f} ms; right after sequences ended "
        f"{len(after)}, median {_median(after):.2f} ms, the others {_median(rest):.2f} ms)"
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class _TracedBudget:
    """The pool's prefill budget, its every answer while prompts wait kept in `granted` as
    (decoding, waiting, prompt tokens granted)."""

    def __init__(self, budget: Any) -> None:
        self.budget = budget
        self.granted: list[tuple[int, int, int]] = []

    def tokens(self, *, decoding: int, waiting: int) -> int:
        n: int = self.budget.tokens(decoding=decoding, waiting=waiting)
        if waiting:
            self.granted.append((decoding, waiting, n))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.budget, name)


def trace_budget(runner: Any) -> list[tuple[int, int, int]]:
    """Each step's (decoding, waiting, prompt tokens granted) as the pool's prefill budget
    answers them (empty for a runner without one)."""
    if not hasattr(runner, "_budget"):
        return []
    runner._budget = _TracedBudget(runner._budget)
    return runner._budget.granted


def budget_went(granted: list[tuple[int, int, int]], runner: Any) -> str:
    """What the budget gave steps beside decode, and what it had learned by the end."""
    beside = sorted(n for d, _, n in granted if d)
    if not beside:
        return "budget: no step beside decode"
    q = [beside[int(f * (len(beside) - 1))] for f in (0.1, 0.5, 0.9)]
    return (
        f"budget: {len(beside)} steps beside decode granted p10/p50/p90 {q[0]}/{q[1]}/{q[2]} "
        f"tokens; learned {runner._budget.describe()}"
    )


def throughput(
    cache: Path,
    sizes: list[int],
    new_tokens: int,
    chunks: list[int],
    stall_limits: tuple[float, ...] | list[float] = (2.0,),
) -> None:
    """Requests arriving together through each runner (the pool's at each prefill chunk in
    `chunks`, under each of `stall_limits`: 0 for none), each ÷ the ideal for that work."""
    vocab = llama_1b_config().vocab_size
    max_len = PROMPT_TOKENS + new_tokens + 8
    bandwidth, rate = copy_bandwidth("cuda"), matmul_rate()
    RESULTS["matmul_TFLOPs"] = rate / 1e12
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    variants: list[tuple[str, Callable[..., Any]]] = [("static", static_runner)]
    for chunk in chunks:
        for limit in stall_limits:
            name = "paged" if chunk == 512 else f"paged, chunk {chunk}"
            name += "" if limit == 2.0 else f", stall limit {limit or 'off'}"
            make = functools.partial(
                paged_runner, prefill_chunk=chunk, prefill_stall_limit=limit or None
            )
            variants.append((name, make))
    for name, make in variants:
        torch._dynamo.reset()
        model = build_1b()
        t0 = time.perf_counter()
        runner = make(model, max_batch=max(sizes), max_len=max_len, cache=cache, buckets=None)
        log(f"{name}: ready in {time.perf_counter() - t0:.1f} s (every batch size captured)")
        paged = name.startswith("paged")
        arrive_together(runner, 8, 16, vocab, paged=paged)  # warm
        granted = trace_budget(runner)
        for n in sizes:
            steps: list[tuple[bool, int, float]] = []
            granted.clear()
            seconds = arrive_together(runner, n, new_tokens, vocab, paged=paged, steps=steps)
            tps = n * new_tokens / seconds
            ideal = ideal_s(model, n, new_tokens, bandwidth, rate)
            went = where_time_went(steps, model, n, new_tokens, bandwidth, rate)
            log(f"{name}: {n} requests: {went}")
            if paged:
                log(f"{name}: {n} requests: {budget_went(granted, runner)}")
                trace = RESULTS.setdefault("budget_trace", {}).setdefault(name, {})
                trace[n] = {"granted": list(granted), "steps": steps}
            RESULTS.setdefault("throughput", {}).setdefault(name, {})[n] = tps
            RESULTS.setdefault("of_ideal", {}).setdefault(name, {})[n] = ideal / seconds
            log(
                f"{name}: {n} requests together: {tps:.0f} tok/s ({seconds:.2f} s; the ideal "
                f"{ideal:.2f} s: {ideal / seconds:.2f} of it)"
            )
        tokens = min(512, max_len - 8)
        ms = prefill_ms(runner, tokens, vocab, paged=paged)
        RESULTS.setdefault("prefill_ms", {})[name] = {"tokens": tokens, "ms": ms}
        log(f"{name}: one {tokens}-token prompt's step alone: {ms:.1f} ms")
        runner.close()
        del runner, model
        torch.cuda.empty_cache()
    figures = RESULTS["throughput"]
    for name in figures:
        for n in sizes:
            if name != "static":
                log(
                    f"{n} requests: {name} ÷ static tok/s = "
                    f"{figures[name][n] / figures['static'][n]:.3f}"
                )


def profile_turns(cache: Path, rows: int, turns: int, history: int, new: int) -> None:
    """The multi-turn shape the server saw (benchmarks/RESULTS.md, issue 14): `rows` streams
    decoding, and `turns` new turns whose first `history` tokens are cached, `new` tokens each to
    prefill. Times a decode step alone and a step with the turns, then prints torch.profiler's
    table of that step (where a prompt step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    vocab = llama_1b_config().vocab_size
    max_len = history + new + 64
    width = -(-max_len // BLOCK)
    torch._dynamo.reset()
    model = build_1b()
    runner = paged_runner(model, max_batch=rows + turns, max_len=max_len, cache=cache, buckets=None)
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)

    def seq(rid: int, tokens: list[int], *, row: int | None = None, cached: int = 0) -> NewSequence:
        """Its blocks those of `row` (default: its rid), the first `cached` tokens' KV there."""
        row = rid if row is None else row
        table = list(range(row * width, (row + 1) * width))
        return NewSequence(rid, tokens, greedy, block_table=table, num_cached_tokens=cached)

    streams = [seq(i, torch.randint(3, vocab, (64,), generator=g).tolist()) for i in range(rows)]
    running = [s.rid for s in streams]
    runner.step(StepBatch(new=streams, running=[], released=[]))
    histories = [torch.randint(3, vocab, (history,), generator=g).tolist() for _ in range(turns)]
    # the turns' histories prefilled once, then released: their blocks stay cached
    firsts = [seq(rows + i, h) for i, h in enumerate(histories)]
    batch = StepBatch(new=firsts, running=running, released=[])
    while True:
        done = runner.step(batch).tokens
        batch = StepBatch(new=[], running=running + [f.rid for f in firsts], released=[])
        if all(f.rid in done for f in firsts):
            break
    runner.step(StepBatch(new=[], running=running, released=[f.rid for f in firsts]))

    def new_turns(rid: int) -> list[NewSequence]:
        """Each history with `new` more tokens, in the blocks its first turn filled."""
        cached = history // BLOCK * BLOCK
        return [
            seq(
                rid + i,
                h + torch.randint(3, vocab, (new,), generator=g).tolist(),
                row=rows + i,
                cached=cached,
            )
            for i, h in enumerate(histories)
        ]

    def timed(news: list[NewSequence]) -> float:
        sync()
        t0 = time.perf_counter()
        runner.step(StepBatch(new=news, running=running, released=[]))
        sync()
        return (time.perf_counter() - t0) * 1e3

    decode = statistics.median(timed([]) for _ in range(20))
    rid = 10_000
    turn_ms = []
    for _ in range(4):
        news = new_turns(rid)
        turn_ms.append(timed(news))
        gone = [n.rid for n in news]
        runner.step(StepBatch(new=[], running=running, released=gone))
        rid += 100
    log(
        f"{rows} streams decoding: a step alone {decode:.2f} ms; with {turns} turns of {new} new "
        f"tokens after {history} cached: {statistics.median(turn_ms[1:]):.1f} ms (runs {turn_ms})"
    )
    RESULTS["profile"] = {"decode_ms": decode, "turns_step_ms": turn_ms}
    news = new_turns(rid)
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        runner.step(StepBatch(new=news, running=running, released=[]))
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by=key, row_limit=25))
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    runner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="correctness,speed")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument(
        "--shape", default="llama-3.2-1b", choices=sorted(MODEL_CLASSES), help="(b)'s model"
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="(c) requests")
    ap.add_argument("--new-tokens", type=int, default=256, help="(c) tokens a request")
    ap.add_argument(
        "--prefill-chunks", type=int, nargs="+", default=[512], help="(c) the pool's, each in turn"
    )
    ap.add_argument(
        "--stall-limits",
        type=float,
        nargs="+",
        default=[2.0],
        help="(c) the pool's --prefill-stall-limit, each in turn (0: none)",
    )
    ap.add_argument("--profile-rows", type=int, default=64, help="(d) streams decoding")
    ap.add_argument("--out", default=None, help="write the figures as JSON into this folder")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: (a) only")
    ap.add_argument("--families", nargs="*", default=[], help="(a): these model types only")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.device == "cpu":
        parts -= {"speed", "throughput", "profile"}
        log("on the CPU: the decode step eager, no graphs")
    else:
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as name:
        cache = Path(name)
        if "correctness" in parts:
            ok = correctness(cache, args.device, args.families)
            log(f"correctness: {'all equal' if ok else 'FAILED'}")
        if "speed" in parts:
            speed(cache, args.batches, args.shape)
        if "throughput" in parts:
            throughput(cache, args.sizes, args.new_tokens, args.prefill_chunks, args.stall_limits)
        if "profile" in parts:
            profile_turns(cache, rows=args.profile_rows, turns=4, history=1500, new=150)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "bench_paged_gpu.json").write_text(json.dumps(RESULTS, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
