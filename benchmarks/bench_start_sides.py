"""Seconds from `chatqueue serve --model DIR` to ready and one answer, for two checkouts side by
side: starts alternate between them, so both see the same machine (any device; on a CPU there
is nothing to compile, so this times the start's imports and loading).

    python3 benchmarks/bench_start_sides.py --model DIR --src old=/path/to/old/src --src new=src \
        [--starts 4] [-- serve flags...]

Each `--src` is a `src` folder the server (and its model process) import chatqueue from.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_start import start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--src", action="append", required=True, help="LABEL=SRC_FOLDER")
    ap.add_argument("--starts", type=int, default=4, help="starts of each")
    ap.add_argument("flags", nargs="*", help="serve flags (after --)")
    args = ap.parse_args()
    sides = dict(s.split("=", 1) for s in args.src)
    work = Path(tempfile.mkdtemp())
    log = work / "servers.log"
    times: dict[str, list[float]] = {label: [] for label in sides}
    for i in range(args.starts + 1):  # the first round warms the caches (page, compile)
        for label, src in sides.items():
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(Path(src).resolve()), *sys.path]),
            }
            proc, _, took = start(
                Path(args.model), work / f"cache-{label}", log, flags=tuple(args.flags), env=env
            )
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            if i:
                times[label].append(took)
            print(f"{label}: {took:.2f} s{'' if i else ' (warm-up, not counted)'}", flush=True)
    for label, took in times.items():
        print(f"{label}: median {statistics.median(took):.2f} s of {[round(t, 2) for t in took]}")
    first, *others = sides
    for label in others:
        ratio = statistics.median(times[label]) / statistics.median(times[first])
        print(f"{label} ÷ {first}: {ratio:.3f}")
    print(f"servers' log: {log}")


if __name__ == "__main__":
    main()
