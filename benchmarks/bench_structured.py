"""What structured output costs the batched sampler, side by side: one `SamplingBatch.sample` over
a batch's logits [B, V] where no row has a grammar mask (the plain path) and where one row has
one (StepBatch.masks: unpacked and applied to that row only); measured in alternation, round by
round, so that load from other processes falls on both alike. Prints each median and the ratio.

    .venv/bin/python benchmarks/bench_structured.py --batch 32 --vocab 49152 --rounds 300

With `--tokenizer FOLDER` (a local HF model folder, e.g. the converted SmolLM2 in
~/.cache/chatqueue/models/), it also times the engine's side: llguidance filling one row's mask
(`GrammarMatcher.mask`) at each token of a JSON reply, and advancing the matcher.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from chatqueue.engine.hf.sampling import SamplingBatch, SamplingRequest
from chatqueue.types import GrammarSpec, SamplingParams


def make(batch: int, vocab: int, *, temperature: float) -> SamplingBatch:
    requests = [
        SamplingRequest(SamplingParams(temperature=temperature, seed=i), [1]) for i in range(batch)
    ]
    return SamplingBatch.create(requests, vocab_size=vocab, device=torch.device("cpu"))


def random_mask(vocab: int, allowed: int) -> bytes:
    words = [0] * ((vocab + 31) // 32)
    for i in random.Random(0).sample(range(vocab), allowed):
        words[i // 32] |= 1 << (i % 32)
    return b"".join(w.to_bytes(4, "little") for w in words)


def sampler(args: argparse.Namespace) -> None:
    logits = torch.randn(args.batch, args.vocab)
    masks = [random_mask(args.vocab, args.vocab // 2), *[None] * (args.batch - 1)]
    for temperature in (0.0, 1.0):
        batch = make(args.batch, args.vocab, temperature=temperature)
        cases = {"no mask": None, "one masked": masks}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, row_masks in cases.items():
                step_logits = logits.clone()  # a step's fresh logits (masking writes in place)
                began = time.perf_counter()
                batch.sample(step_logits, masks=row_masks).tokens.tolist()
                times[name].append(time.perf_counter() - began)
        base = statistics.median(times["no mask"])
        kind = "greedy" if temperature == 0 else "sampled"
        for name, ts in times.items():
            median = statistics.median(ts)
            print(
                f"{kind:8s} B={args.batch} V={args.vocab} {name:11s} "
                f"{median * 1e3:7.3f} ms  x{median / base:.2f}"
            )


def matcher(folder: Path) -> None:
    from chatqueue.text.grammar import GrammarCompiler
    from chatqueue.text.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder, model_name=folder.name, chat_template=None)
    compiler = GrammarCompiler(tokenizer)
    began = time.perf_counter()
    compiler.vocabulary()
    print(f"llguidance vocabulary index: {time.perf_counter() - began:.2f} s (once per model)")
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "size": {"type": "integer"},
        },
        "required": ["name", "tags", "size"],
    }
    began = time.perf_counter()
    fresh = compiler.matcher(GrammarSpec.json_schema(schema))
    print(f"compile: {(time.perf_counter() - began) * 1e3:.1f} ms (then cached by schema)")
    reply = json.dumps({"name": "a queue in front of a model", "tags": ["x", "yz"], "size": 12})
    masks, advances = [], []
    for token in tokenizer.encode(reply):
        began = time.perf_counter()
        fresh.mask()
        masks.append(time.perf_counter() - began)
        began = time.perf_counter()
        assert fresh.advance(token)
        advances.append(time.perf_counter() - began)
    print(
        f"per token, {len(masks)} tokens: mask median {statistics.median(masks) * 1e6:.0f} us "
        f"(max {max(masks) * 1e6:.0f}), advance median {statistics.median(advances) * 1e6:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    sampler(args)
    if args.tokenizer is not None:
        matcher(args.tokenizer)


if __name__ == "__main__":
    main()
