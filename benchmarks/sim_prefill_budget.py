"""The prefill budget (`engine/prefill_budget.py`) driven by made-up step costs: 64 multi-turn
chats in closed loop on the clock of their own steps, no model, no GPU (seconds on a CPU).

Each chat: a first turn of 320-500 prompt tokens, then turns of 20-200 more, replies of 100-300
tokens, 0.5-1.5 s of thought between. A step costs a decode step of `--decode-ms` + `--row-us` a
row, plus, where it has prompt tokens, `--fixed-ms` + `--token-us` a token; every step is
`--noise` noisy (lognormal) and one in a hundred 2-20 ms slower. `--warmup-ms`: the first step
(465 prompt tokens alone) takes that long, as a server's first step did on an H100. Prints, for
each tree (this checkout's `src`, and `--base DIR` another's, side by side in one run) and seed:
the time to first token of turns >= 3 (p50, p99), the grants beside decode (p10/p50/p90), and
the steps with prompt tokens beside decode, p99, against a decode step alone (p50).

    .venv/bin/python benchmarks/sim_prefill_budget.py [--limit 2] [--fixed-ms 2.0] [--seeds 3]
        [--base /tmp/base/src]   # e.g. `git archive REV src | tar -x -C /tmp/base`
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load(src: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"budget_{abs(hash(src))}", src / "chatqueue" / "engine" / "prefill_budget.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def chats(
    budget: object, rng: random.Random, args: argparse.Namespace
) -> tuple[list[float], list[int], list[float], list[float]]:
    """Each turn's time to its first token (turns >= 3), the grants beside decode, and the
    times of steps with decode rows (with prompt tokens, and without)."""
    chats_ = args.chats
    prompt = {c: (rng.randint(320, 500), 0.0, 1) for c in range(chats_)}  # tokens, since, turn
    order = list(range(chats_))
    decoding: dict[int, tuple[int, int]] = {}  # tokens left, turn
    thinking: dict[int, tuple[float, int]] = {}  # until when, turn
    now, ttfts, grants, first = 0.0, [], [], True
    mixed: list[float] = []
    alone: list[float] = []
    while now < args.seconds:
        for chat, (until, turn) in list(thinking.items()):
            if until <= now:
                del thinking[chat]
                prompt[chat] = (rng.randint(20, 200), now, turn + 1)
                order.remove(chat)
                order.append(chat)
        if not decoding and not prompt:
            now = min(until for until, _ in thinking.values())
            continue
        rows, n, done = len(decoding), 0, []
        if prompt:
            left = budget.tokens(  # type: ignore[attr-defined]
                decoding=rows, waiting=len(prompt)
            )
            if rows:
                grants.append(left)
            for chat in [c for c in order if c in prompt]:
                tokens, since, turn = prompt[chat]
                took = min(tokens, left)
                left, n = left - took, n + took
                if took < tokens:
                    prompt[chat] = (tokens - took, since, turn)
                    break
                done.append(chat)
        step = (args.decode_ms + args.row_us / 1e3 * rows if rows else 0.0) + (
            args.fixed_ms + args.token_us / 1e3 * n if n else 0.0
        )
        step = step / 1e3 * rng.lognormvariate(0, args.noise)
        if rng.random() < 0.01:
            step += rng.uniform(0.002, 0.02)
        if first and args.warmup_ms:
            step, first = args.warmup_ms / 1e3, False
        budget.observe(step, decode_rows=rows, prompt_tokens=n)  # type: ignore[attr-defined]
        if rows:
            (mixed if n else alone).append(step)
        now += step
        for chat, (left_, turn) in list(decoding.items()):
            if left_ > 1:
                decoding[chat] = (left_ - 1, turn)
            else:
                del decoding[chat]
                thinking[chat] = (now + rng.uniform(0.5, 1.5), turn)
        for chat in done:
            _, since, turn = prompt.pop(chat)
            if turn >= 3:
                ttfts.append(now - since)
            decoding[chat] = (rng.randint(100, 300), turn)
    return ttfts, grants, mixed, alone


def pct(values: list[float] | list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--limit", type=float, default=2.0, help="--prefill-stall-limit")
    ap.add_argument("--chunk", type=int, default=512, help="--prefill-chunk")
    ap.add_argument("--decode-ms", type=float, default=1.2)
    ap.add_argument("--row-us", type=float, default=8.0)
    ap.add_argument("--fixed-ms", type=float, default=2.0)
    ap.add_argument("--token-us", type=float, default=5.0)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--warmup-ms", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--chats", type=int, default=64)
    ap.add_argument("--base", type=Path, default=None, help="another tree's src, to compare")
    args = ap.parse_args()
    trees = {"this": HERE.parent / "src", **({"base": args.base} if args.base else {})}
    for name, src in trees.items():
        module = load(src)
        for seed in range(args.seeds):
            ttfts, grants, mixed, alone = chats(
                module.PrefillBudget(args.chunk, args.limit), random.Random(seed), args
            )
            print(
                f"{name} seed {seed}: TTFT turns>=3 p50 {pct(ttfts, 50) * 1e3:.0f} ms p99 "
                f"{pct(ttfts, 99) * 1e3:.0f} ms (n={len(ttfts)}); grants beside decode "
                f"p10/p50/p90 {pct(grants, 10)}/{pct(grants, 50)}/{pct(grants, 90)}; steps "
                f"beside decode p99 {pct(mixed, 99) / pct(alone, 50):.1f}x a decode step's p50"
            )


if __name__ == "__main__":
    main()
