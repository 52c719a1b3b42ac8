"""Multi-turn chats against a real server, prefix reuse on and off, side by side in one run.

The workload (generated here, no data set): every conversation starts with the same system
prompt (~300 tokens), then 6-10 turns; a user turn is 20-200 tokens of words, a reply 100-300
tokens (greedy, `ignore_eos`, so its length is what was drawn), and each turn re-sends the whole
conversation, as the OpenAI API does, after a think time. N conversations run at once.

For each setting (`--prefix-caching on`, then `off`: the same seed, the same pool) it starts
`chatqueue serve`, runs the workload over HTTP (streamed /v1/chat/completions with usage) and
prints:
- prefill tokens computed / prompt tokens received (computed = prompt - cached_tokens);
- TTFT p50 and p99 of turns >= 3, and on / off;
- the gap between a stream's chunks, p50 and p99, and p99 of the gaps during which another
  request was prefilling (sent, no first token yet);
- KV tokens reserved / live, from /load sampled every 0.2 s while requests run (reserved: the
  blocks held x block size; live: the tokens the running requests hold, a shared prefix once
  for each request);
- the KV tokens held a running request (reserved / running, the mean of the samples), and so
  how many streams a fixed KV budget holds paged, over the static cache, which reserves the
  context window (`/v1/models`) for every slot whatever the request's length.

CPU (SmolLM2, the default model):
    .venv/bin/python benchmarks/bench_multiturn.py [--reply-tokens 100 300] [--conversations 8]
GPU (a Llama-3.2-1B-shaped model with random bf16 weights and SmolLM2's tokenizer, saved once
to a temporary folder; the paged runner with its graphed decode step, `--kv-cache paged`;
`--tokenizer-from` a folder holding SmolLM2's tokenizer files where the converted default model
is not in the cache, as on a fresh GPU machine):
    .venv/bin/python benchmarks/bench_multiturn.py --device cuda --conversations 64
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import pct, running_server

_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy process music market sense nation plan college interest "
    "death experience effect use class control care field development role effort rate heart "
    "drug show leader light voice wife police mind price report decision son view relationship"
)
WORDS = _TEXT.split()


@dataclass
class Turn:
    conversation: int
    index: int  # 0-based turn number
    sent: float = 0.0
    stamps: list[float] = field(default_factory=list)  # arrival of each content chunk
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent


@dataclass
class Run:
    turns: list[Turn]
    kv_samples: list[tuple[int, int, int]]  # (reserved tokens, live tokens, running requests)
    preemptions: float
    wall_s: float
    context_window: int  # the tokens the static cache reserves for each slot


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_prompt() -> str:
    rng = random.Random(0)
    return "You are a helpful assistant. Keep these notes in mind: " + words(rng, 280) + "."


async def conversation(
    session: aiohttp.ClientSession, url: str, number: int, args: argparse.Namespace
) -> list[Turn]:
    rng = random.Random(args.seed * 1000 + number)
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt()}]
    turns = []
    await asyncio.sleep(rng.uniform(0, args.think_s))  # arrivals spread out, not in lockstep
    for index in range(rng.randint(*args.turns)):
        messages.append({"role": "user", "content": words(rng, rng.randint(*args.user_tokens))})
        turn = Turn(number, index)
        reply = await ask(session, url, messages, rng.randint(*args.reply_tokens), turn)
        turns.append(turn)
        messages.append({"role": "assistant", "content": reply})
        await asyncio.sleep(rng.uniform(0.5, 1.5) * args.think_s)
    return turns


async def ask(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    turn: Turn,
) -> str:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    turn.sent = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"] and (text := chunk["choices"][0]["delta"].get("content")):
                turn.stamps.append(time.perf_counter())
                parts.append(text)
            if usage := chunk.get("usage"):
                turn.prompt_tokens = usage["prompt_tokens"]
                turn.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                turn.completion_tokens = usage["completion_tokens"]
    return "".join(parts)


def sample_kv(url: str, stop: threading.Event, out: list[tuple[int, int, int]]) -> None:
    """/load every 0.2 s; every 10 s a line of it, to follow a long run (with what the prefill
    budget has learned: a decode step, a prompt token, a prompt step's fixed cost)."""
    began = time.perf_counter()
    with httpx.Client(timeout=30) as client:
        for sample in itertools.count():
            if stop.wait(0.2):
                break
            try:
                load = client.get(f"{url}/load").json()
            except httpx.TransportError:  # a keep-alive connection closed under us: ask again
                continue
            if sample % 50 == 49:
                print(
                    f"  {time.perf_counter() - began:.0f} s: processing {load['processing']}, "
                    f"waiting {load['waiting']}, KV blocks used {load['kv_blocks_used']}, "
                    f"prefill {load.get('prefill')}",
                    flush=True,
                )
            if load["processing"] and load["kv_blocks_used"] is not None:
                reserved = load["kv_blocks_used"] * load["kv_block_size"]
                out.append((reserved, load["kv_tokens_live"], load["processing"]))


async def workload(url: str, args: argparse.Namespace) -> list[Turn]:
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(
            *(conversation(session, url, n, args) for n in range(args.conversations))
        )
    return [turn for turns in results for turn in turns]


def run_one(serve_args: list[str], args: argparse.Namespace, tmp: Path) -> Run:
    started = time.perf_counter()
    with running_server(*serve_args, tmp_path=tmp, ready_timeout_s=600) as server:
        print(f"  server ready in {time.perf_counter() - started:.0f} s", flush=True)
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        context_window = int(models["data"][0]["context_window"])
        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=sample_kv, args=(server.url, stop, samples))
        sampler.start()
        began = time.perf_counter()
        try:
            turns = asyncio.run(workload(server.url, args))
        except BaseException:
            print(server.log()[-4000:], file=sys.stderr)
            raise
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - began
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        preemptions = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("chatqueue_preemptions_total ")
        )
    return Run(turns, samples, preemptions, wall, context_window)


def gaps(turns: list[Turn]) -> tuple[list[float], list[float]]:
    """Every gap between a stream's chunks, and those during which another request prefilled."""
    prefilling = [(t.sent, t.stamps[0]) for t in turns if t.stamps]
    every, during = [], []
    for turn in turns:
        for start, end in zip(turn.stamps, turn.stamps[1:], strict=False):
            every.append(end - start)
            if any(
                s < end and f > start
                for s, f in prefilling
                if (s, f) != (turn.sent, turn.stamps[0])
            ):
                during.append(end - start)
    return every, during


def report(name: str, run: Run) -> dict[str, float]:
    turns = [t for t in run.turns if t.stamps]
    received = sum(t.prompt_tokens for t in turns)
    computed = sum(t.prompt_tokens - t.cached_tokens for t in turns)
    late = [t.ttft for t in turns if t.index >= 2]
    every, during = gaps(turns)
    reserved = sum(r for r, _, _ in run.kv_samples)
    live = sum(n for _, n, _ in run.kv_samples)
    held = [r / running for r, _, running in run.kv_samples]  # KV a running request holds
    held_mean = sum(held) / len(held) if held else float("nan")
    figures = {
        "computed_ratio": computed / received,
        "ttft_p50": pct(late, 50),
        "ttft_p99": pct(late, 99),
        "gap_p50": pct(every, 50),
        "gap_p99": pct(every, 99),
        "gap_prefill_p99": pct(during, 99),
        # issue 14's goal: <= 4x the step; the p50 gap is the step as the server runs it
        "gap_prefill_p99_over_p50": pct(during, 99) / (pct(every, 50) or float("nan")),
        "reserved_live": reserved / live if live else float("nan"),
        "kv_held_a_stream": held_mean,
        "streams_a_budget_paged_over_static": run.context_window / held_mean,
    }
    print(
        f"prefix caching {name}: {len(turns)} turns in {run.wall_s:.0f} s, prompt tokens "
        f"{received}, computed {computed} ({figures['computed_ratio']:.3f}); TTFT turns>=3 "
        f"p50 {figures['ttft_p50'] * 1e3:.0f} ms p99 {figures['ttft_p99'] * 1e3:.0f} ms "
        f"(n={len(late)}); gap p50 {figures['gap_p50'] * 1e3:.1f} ms p99 "
        f"{figures['gap_p99'] * 1e3:.1f} ms, p99 while others prefill "
        f"{figures['gap_prefill_p99'] * 1e3:.1f} ms "
        f"({figures['gap_prefill_p99_over_p50']:.1f}x the p50 gap, n={len(during)}); "
        f"KV reserved/live {figures['reserved_live']:.3f}; KV held a running request "
        f"{held_mean:.0f} tokens, so a fixed KV budget holds "
        f"{figures['streams_a_budget_paged_over_static']:.2f}x the streams of the static cache "
        f"({run.context_window} tokens a slot); preemptions {run.preemptions:.0f}",
        flush=True,
    )
    return figures


def gpu_model_folder(tmp: Path, tokenizer_from: Path | None) -> Path:
    """A Llama-3.2-1B-shaped model with random bf16 weights and SmolLM2's tokenizer (the vocab
    resized to it), saved for `chatqueue serve --model`."""
    import torch
    from benchmarks.gpu_model import llama_1b_config
    from transformers import LlamaForCausalLM

    from chatqueue.engine.hf import gguf_cache

    smollm2 = tokenizer_from or gguf_cache.default_model_folder()
    config = llama_1b_config()
    tokenizer_files = [p for p in smollm2.iterdir() if "token" in p.name or p.suffix == ".jinja"]
    config.vocab_size = json.loads((smollm2 / "config.json").read_text())["vocab_size"]
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp / "llama-1b-random"
    model.save_pretrained(folder)
    for path in tokenizer_files:
        shutil.copy(path, folder / path.name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--conversations", type=int, default=None, help="default: 8 (cpu), 64 (cuda)")
    ap.add_argument("--turns", type=int, nargs=2, default=[6, 10])
    ap.add_argument("--user-tokens", type=int, nargs=2, default=[20, 200])
    ap.add_argument("--reply-tokens", type=int, nargs=2, default=[100, 300])
    ap.add_argument("--think-s", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["on", "off"])
    ap.add_argument("--serve-args", default="", help="more `chatqueue serve` flags")
    ap.add_argument("--tokenizer-from", type=Path, default=None, help="SmolLM2's tokenizer files")
    args = ap.parse_args()
    args.conversations = args.conversations or (64 if args.device == "cuda" else 8)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        base = [
            "--max-concurrent", str(args.conversations),
            "--history", "memory",
            "--data-dir", str(tmp),
            "--log-level", "warning",
        ]  # fmt: skip
        if args.device == "cuda":
            base += ["--model", str(gpu_model_folder(tmp, args.tokenizer_from)), "--device", "cuda"]
            base += ["--kv-cache", "paged"]
        base += args.serve_args.split()
        print(
            f"{args.conversations} conversations, turns {args.turns}, user tokens "
            f"{args.user_tokens}, replies {args.reply_tokens}, think {args.think_s} s; "
            f"serve {' '.join(base)}",
            flush=True,
        )
        figures = {
            mode: report(mode, run_one([*base, "--prefix-caching", mode], args, tmp))
            for mode in args.modes
        }
    if {"on", "off"} <= set(figures):
        on, off = figures["on"], figures["off"]
        print(
            f"on / off: TTFT turns>=3 p50 {on['ttft_p50'] / off['ttft_p50']:.2f}, p99 "
            f"{on['ttft_p99'] / off['ttft_p99']:.2f}; computed/received "
            f"{on['computed_ratio']:.3f} vs {off['computed_ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
