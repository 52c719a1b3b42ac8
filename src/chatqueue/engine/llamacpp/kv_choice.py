"""How llama.cpp keeps the KV cache: q8_0 or f16, with flash attention or without, chosen by
measuring each on this CPU (`--llamacpp-kv auto`), once per CPU, model and llama.cpp version, the
choice kept in the cache folder.

NOTE: why measured. Which is fastest depends on the CPU and the context's length, by up to 2x
(RESULTS.md, issue 17). One thread, decode ms a step: on a 2-vCPU Intel Xeon (AVX-512, AMX),
8 sequences at 40 positions q8_0 64.9, f16 with flash attention 74.0, f16 without 80.4; at 1,000
positions 122.8, 252.6, 117.8. On a 2-vCPU AMD EPYC (Zen 4, AVX-512) at 80 positions 67.2, 63.0,
71.4; at 900 114.0, 97.3, 90.2. So the Xeon wants q8_0 and the EPYC f16 with flash attention,
and f16 without it is best only for long contexts on both. The measurement times one sequence's
decode step at a short and at a long context (the kinds rank alike at 1 and 8 sequences on both
machines), and takes the kind with the least product (geometric mean) of the two.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from chatqueue.engine.llamacpp.batch import TokenBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVKind:
    type_kv: int  # ggml's type of K and V
    flash_attention: bool  # a quantized V cache needs it


KINDS = {
    "q8_0": KVKind(llama_cpp.GGML_TYPE_Q8_0, True),
    "f16": KVKind(llama_cpp.GGML_TYPE_F16, True),
    "f16-noflash": KVKind(llama_cpp.GGML_TYPE_F16, False),
}

FALLBACK = "q8_0"  # where the measurement fails (not kept: the next start measures again)
POSITIONS = (32, 256)  # the short and the long context each kind is timed at
ROUNDS = 4  # of STEPS decode steps of each kind in turn, at each context; the best round counts
STEPS = 4


def choose(
    model: llama_cpp.llama_model_p,
    make_context: Callable[[KVKind, int, int], llama_cpp.llama_context_p],
    *,
    gguf: Path,
    threads: int,
    cache_file: Path | None,
) -> str:
    """The kind to use: as kept in `cache_file` for this CPU, model, thread count and llama.cpp,
    else measured now (`make_context(kind, sequences, cells a sequence)`) and kept."""
    key = _key(gguf, threads)
    kept = _read(cache_file)
    if key in kept:
        return str(kept[key]["kind"])
    began = time.perf_counter()
    try:
        ms = measure(model, make_context, threads)
    except Exception:  # a serving model matters more than the fastest cache: say so, go on
        log.warning("measuring llama.cpp's KV cache kinds failed; %s", FALLBACK, exc_info=True)
        return FALLBACK
    kind = min(ms, key=lambda k: math.prod(ms[k]))
    log.info(
        "llama.cpp KV cache: %s, measured in %.1f s (ms a decode step at %s positions: %s)",
        kind,
        time.perf_counter() - began,
        " and ".join(map(str, POSITIONS)),
        "; ".join(f"{k} {' and '.join(f'{x:.2f}' for x in v)}" for k, v in ms.items()),
    )
    if cache_file is not None:
        kept[key] = {"kind": kind, "ms": ms}
        _write(cache_file, kept)
    return kind


def measure(
    model: llama_cpp.llama_model_p,
    make_context: Callable[[KVKind, int, int], llama_cpp.llama_context_p],
    threads: int,
) -> dict[str, list[float]]:
    """ms a decode step of one sequence at each of POSITIONS, for every kind: the kinds' contexts
    side by side, timed in turn (the machine's noise falls on each), the best round of each.
    The contexts are filled on every core (a prompt's worth of compute, the costly part), and
    timed on `threads`, as they will run."""
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    token = min(1000, vocab - 1)
    cells = POSITIONS[-1] + STEPS + 1
    contexts = {name: make_context(kind, 1, cells) for name, kind in KINDS.items()}
    batch = TokenBatch(cells)
    ms: dict[str, list[float]] = {name: [] for name in KINDS}
    filled = 0
    try:
        for positions in POSITIONS:
            for ctx in contexts.values():
                llama_cpp.llama_set_n_threads(ctx, os.cpu_count() or 1, os.cpu_count() or 1)
                batch.clear()
                batch.add([token] * (positions - filled), seq_id=0, start=filled, logits_last=True)
                _decode(ctx, batch)
                llama_cpp.llama_set_n_threads(ctx, threads, threads)
            best = dict.fromkeys(KINDS, math.inf)
            for _ in range(ROUNDS):
                for name, ctx in contexts.items():
                    began = time.perf_counter()
                    for step in range(STEPS):
                        batch.clear()
                        batch.add([token], seq_id=0, start=positions + step, logits_last=True)
                        _decode(ctx, batch)
                    best[name] = min(best[name], (time.perf_counter() - began) / STEPS * 1e3)
                    # back to `positions`: the next round (or context) goes on from there
                    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, positions, -1)
            for name in KINDS:
                ms[name].append(best[name])
            filled = positions
    finally:
        for ctx in contexts.values():
            llama_cpp.llama_free(ctx)
    return ms


def _decode(ctx: llama_cpp.llama_context_p, batch: TokenBatch) -> None:
    code = llama_cpp.llama_decode(ctx, batch.as_llama_batch())
    if code != 0:
        raise RuntimeError(f"llama_decode returned {code} while measuring the KV cache")


def _key(gguf: Path, threads: int) -> str:
    stat = gguf.stat()
    return "|".join(
        [
            _cpu_name(),
            str(os.cpu_count()),
            f"threads={threads}",
            f"llama_cpp={llama_cpp.__version__}",
            f"{gguf.name}:{stat.st_size}",
        ]
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path | None) -> dict[str, dict[str, object]]:
    if path is None:
        return {}
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _write(path: Path, kept: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(kept, indent=1))
        os.replace(tmp, path)  # whole or not at all: another process may read it
    except OSError as exc:
        log.warning("could not keep the KV cache choice in %s: %s", path, exc)
