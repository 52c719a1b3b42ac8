"""The prefill budget (`engine/prefill_budget.py`) driven by made-up step costs: 64 multi-turn
chats in closed loop on the clock of their own steps, no model, no GPU (seconds on a CPU; the
simulation is `tests/support/budget_sim.py`, which the budget's unit tests drive too).

Each chat: a first turn of 320-500 prompt tokens, then turns of 20-200 more, replies of 100-300
tokens, 0.5-1.5 s of thought between. A step costs a decode step of `--decode-ms` + `--row-us` a
row, plus, where it has prompt tokens, `--fixed-ms` + `--token-us` a token; every step is
`--noise` noisy (lognormal) and one in a hundred 2-20 ms slower. `--warmup-ms`: the first step
(prompts alone, a whole chunk) takes that long, as a server's first step did on an H100. Prints, for
each tree (this checkout's `src`, and `--base DIR` another's, side by side in one run) and seed:
the time to first token of turns >= 3 (p50, p99), the grants beside decode (p10/p50/p90), and
the steps with prompt tokens beside decode, p99, against a decode step alone (p50).
`--packed`: a step with prompt tokens runs its decode rows in it (the pool's packed step on a
GPU: `--fixed-ms` + `--token-us` a token of both), `--h100`: the costs an H100 measured so.
`--burst N`: N requests of 256-token prompts arriving together instead, 256 tokens each (issue
6's burst): the run's time at the limit against no limit, and the grants beside decode;
`--after`: on a budget that has first run 8 requests of 16 tokens and 64 together, as the GPU
benchmark's (`bench_paged_gpu.py --parts throughput`) does.

    .venv/bin/python benchmarks/sim_prefill_budget.py [--limit 2] [--fixed-ms 2.0] [--seeds 3]
        [--base /tmp/base/src]   # e.g. `git archive REV src | tar -x -C /tmp/base`
    .venv/bin/python benchmarks/sim_prefill_budget.py --h100 --burst 256 [--after]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.support.budget_sim import (  # noqa: E402
    H100_KNEE,
    H100_PACKED,
    H100_TRACED,
    StepCosts,
    simulate_burst,
    simulate_chats,
)


def load(src: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"budget_{abs(hash(src))}", src / "chatqueue" / "engine" / "prefill_budget.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
    ap.add_argument("--packed", action="store_true", help="decode rows ride in prompt steps")
    ap.add_argument("--h100", action="store_true", help="the packed costs an H100 measured")
    ap.add_argument(
        "--h100-traced", action="store_true", help="the costs of session 25's burst trace"
    )
    ap.add_argument(
        "--knee", action="store_true", help="--h100-traced, its decode step flat to 64 rows"
    )
    ap.add_argument(
        "--packed-row-us", type=float, default=None, help="a decode row's cost in a packed step"
    )
    ap.add_argument("--burst", type=int, default=0, help="this many requests together instead")
    ap.add_argument(
        "--after", action="store_true", help="--burst after a warm-up of 8 and 64 together"
    )
    ap.add_argument("--base", type=Path, default=None, help="another tree's src, to compare")
    args = ap.parse_args()
    trees = {"this": HERE.parent / "src", **({"base": args.base} if args.base else {})}
    costs = StepCosts(
        decode_s=args.decode_ms / 1e3,
        row_s=args.row_us / 1e6,
        fixed_s=args.fixed_ms / 1e3,
        token_s=args.token_us / 1e6,
        noise=args.noise,
        packed=args.packed,
    )
    if args.h100:
        costs = H100_PACKED
    if args.h100_traced:
        costs = H100_TRACED
    if args.knee:
        costs = H100_KNEE
    if args.packed_row_us is not None:
        costs = dataclasses.replace(costs, packed_row_s=args.packed_row_us / 1e6)
    for name, src in trees.items():
        module = load(src)
        for seed in range(args.seeds):
            if args.burst:
                runs = []
                for limit in (args.limit, None):
                    budget, rng = module.PrefillBudget(args.chunk, limit), random.Random(seed)
                    if args.after:  # as bench_paged_gpu.py runs it: a warm-up, then 64 together
                        simulate_burst(budget, rng, costs=costs, requests=8, new_tokens=16)
                        simulate_burst(budget, rng, costs=costs, requests=64)
                    runs.append(simulate_burst(budget, rng, costs=costs, requests=args.burst))
                grants = runs[0].grants
                print(
                    f"{name} seed {seed}: {args.burst} requests together at the limit "
                    f"{runs[0].seconds:.3f} s, without {runs[1].seconds:.3f} s "
                    f"({runs[0].seconds / runs[1].seconds:.2f}x); steps with prompt tokens "
                    f"{runs[0].steps_with_prompts} (without {runs[1].steps_with_prompts}); grants "
                    f"beside decode p10/p50/p90 {pct(grants, 10)}/{pct(grants, 50)}/"
                    f"{pct(grants, 90)}"
                )
                continue
            run = simulate_chats(
                module.PrefillBudget(args.chunk, args.limit),
                random.Random(seed),
                costs=costs,
                chats=args.chats,
                seconds=args.seconds,
                warmup_s=args.warmup_ms / 1e3,
            )
            ttfts, grants = run.ttfts, run.grants
            print(
                f"{name} seed {seed}: TTFT turns>=3 p50 {pct(ttfts, 50) * 1e3:.0f} ms p99 "
                f"{pct(ttfts, 99) * 1e3:.0f} ms (n={len(ttfts)}); grants beside decode "
                f"p10/p50/p90 {pct(grants, 10)}/{pct(grants, 50)}/{pct(grants, 90)}; steps "
                f"beside decode p99 {pct(run.mixed, 99) / pct(run.alone, 50):.1f}x a decode "
                "step's p50"
            )


if __name__ == "__main__":
    main()
