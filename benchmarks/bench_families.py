"""The static-cache runner on every supported family, in one run on a GPU:

  (a) correctness: each family's tiny fp32 model (tests/support/tiny_families.py) through the path
      the GPU serves (decode compiled by Inductor, CUDA graphs, Triton attention): greedy tokens
      equal to `generate()` token for token, logprobs within 1e-3, for requests joining at
      different steps, a prompt longer than the sliding window, the cache wrapping;
  (b) speed: decode ms/step ÷ the memory-bandwidth floor at batch 1 and 64, bf16, random weights
      in the shapes of Llama-3.2-1B, Qwen3-1.7B and Gemma-3-1B; each family's figure ÷ Llama's
      (goal: within 1.10);
  (c) memory (`--parts memory`, any machine): the static cache's KV bytes a row with its
      sliding-window layers as rings of their window, against full rows, in those shapes.

The floor is (weight bytes + the KV bytes a step reads at the sequences' mean length) ÷ the copy
bandwidth measured here; a sliding-window layer reads at most its window. Each figure is a median
of steps after a warm-up; the three models are measured one after another in the same process.

    python benchmarks/bench_families.py [--parts correctness,speed] [--families qwen3,...] [--out DIR]
    .venv/bin/python benchmarks/bench_families.py --device cpu --quick   # anywhere, small shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support

from chatqueue.engine.hf.static import StaticCacheRunner
from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.types import SamplingParams
from tests.support import tiny_families

RESULTS: dict[str, Any] = {}
PROMPT_TOKENS = 256
DECODE_STEPS = 64


def log(msg: str) -> None:
    print(msg, flush=True)


# -- (a) correctness ------------------------------------------------------------------------
def correctness(device: str, compile: bool, only: list[str] | None, cache: Path) -> bool:
    """Each family's tiny fp32 model through the path this device serves (its decode regions
    compiled ahead of time into `cache`, as the server does); True if all equal."""
    ok = True
    families: dict[str, Any] = {
        f: lambda f=f: tiny_families.tiny(f, device) for f in tiny_families.FAMILIES
    }
    families["gemma3"] = lambda: tiny_families.tiny_gemma3_multimodal(device)
    for name, build in families.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        torch._dynamo.reset()
        make = functools.partial(
            StaticCacheRunner,
            max_batch=5,
            max_len=40,
            prefill_chunk=16,
            compile=compile,
            use_cuda_graphs=device == "cuda",
            compile_cache=cache / name,
        )
        try:
            runner, found = tiny_families.mismatches(
                build(), lambda m, make=make: make(model=m), logprob_tol=1e-3
            )
            attention = runner.decode.attention_kernel
            graphs = sorted(runner.graphs.captured)
            runner.close()
        except Exception:  # one family failing must not hide the others' results
            found, attention, graphs = [traceback.format_exc(limit=3)], "?", []
        ok &= not found
        RESULTS.setdefault("correctness", {})[name] = found or "equal"
        log(
            f"correctness {name:20s} {'EQUAL' if not found else 'DIFFERENT'} to generate() "
            f"(attention {attention}, compiled {compile}, graphs {graphs}, "
            f"{time.perf_counter() - t0:.1f} s)"
        )
        for line in found:
            log(f"    {line}")
    return ok


# -- (b) speed ------------------------------------------------------------------------------
def shaped(name: str, quick: bool) -> transformers.PretrainedConfig:
    """Configs in the published models' shapes (config.json of each); `quick`: 2 layers and a
    small vocabulary, for a CPU."""
    if name == "llama-3.2-1b":
        config: Any = transformers.LlamaConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    elif name == "qwen3-1.7b":
        config = transformers.Qwen3Config(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    elif name == "gemma-3-1b":
        config = transformers.Gemma3TextConfig(
            vocab_size=262144,
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            layer_types=[
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)
            ],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
    else:
        raise ValueError(name)
    if quick:
        config.num_hidden_layers = 2
        config.vocab_size = 4096
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = config.layer_types[-2:]
    return config


MODEL_CLASSES = {
    "llama-3.2-1b": "LlamaForCausalLM",
    "qwen3-1.7b": "Qwen3ForCausalLM",
    "gemma-3-1b": "Gemma3ForCausalLM",
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(512 * 1024 * 1024 // 2, dtype=torch.bfloat16, device=device)  # 512 MiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(20):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * 512 * 1024 * 1024 / statistics.median(times[5:])


def decode_ms(runner: StaticCacheRunner, batch: int, device: str, vocab: int) -> float:
    """Median ms of one decode step (sampling and the token ids' transfer included) for `batch`
    running sequences of PROMPT_TOKENS prompts."""
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(batch)
    ]
    news = [NewSequence(i, p, greedy) for i, p in enumerate(prompts)]
    ids = [n.rid for n in news]
    got = runner.step(StepBatch(new=news, running=[], released=[])).tokens
    while len(got) < batch:  # chunked prefill may take several steps
        got |= runner.step(StepBatch(new=[], running=ids, released=[])).tokens
    times = []
    for _ in range(DECODE_STEPS):
        sync(device)
        t0 = time.perf_counter()
        runner.step(StepBatch(new=[], running=ids, released=[]))  # ends in one .tolist()
        times.append(time.perf_counter() - t0)
    runner.step(StepBatch(new=[], running=[], released=ids))
    return statistics.median(times[8:]) * 1e3


def floor_ms(model: Any, runner: StaticCacheRunner, batch: int, bandwidth: float) -> float:
    """Weight bytes + the KV bytes each layer reads at the sequences' mean length (a sliding
    layer: at most its window), ÷ the copy bandwidth."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    shape = runner.slots.shape
    length = PROMPT_TOKENS + DECODE_STEPS / 2
    per_column = 2 * shape.kv_heads * shape.head_dim * runner.slots.k[0].element_size()
    kv = sum(
        per_column * min(length, layer.window or length) for layer in runner.decode.plan.layers
    )
    return (weights + batch * kv) / bandwidth * 1e3


def speed(device: str, quick: bool, models: list[str]) -> None:
    bandwidth = copy_bandwidth(device)
    RESULTS["copy_bandwidth_GBps"] = bandwidth / 1e9
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = [1, 64] if not quick else [1, 4]
    figures: dict[str, dict[int, float]] = {}
    for name in models:
        config = shaped(name, quick)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.device(device):
            model = getattr(transformers, MODEL_CLASSES[name])(config).to(dtype).eval()
        runner = StaticCacheRunner(
            model=model,
            max_batch=max(batches),
            # rows decode while later prompts still prefill (4,096 prompt tokens a step)
            max_len=PROMPT_TOKENS + DECODE_STEPS + 8 + -(-max(batches) * PROMPT_TOKENS // 4096),
            prefill_chunk=4096,
            use_cuda_graphs=False,  # captured below at the two sizes measured only
            compile=device == "cuda",
        )
        if device == "cuda":
            runner.graphs.buckets = sorted({max(2, b) for b in batches})
            runner.graphs.capture()
            runner.slots.reset()
        log(f"{name}: runner ready in {time.perf_counter() - t0:.1f} s ({runner.info})")
        figures[name] = {}
        for batch in batches:
            ms = decode_ms(runner, batch, device, config.vocab_size)
            floor = floor_ms(model, runner, batch, bandwidth)
            figures[name][batch] = ms / floor
            RESULTS.setdefault("speed", {}).setdefault(name, {})[batch] = {
                "ms": ms,
                "floor_ms": floor,
                "ratio": ms / floor,
            }
            log(
                f"{name}: decode batch {batch}: {ms:.3f} ms/step ÷ floor {floor:.3f} ms = {ms / floor:.2f}x"
            )
        runner.close()
        del runner, model
        if device == "cuda":
            torch.cuda.empty_cache()
    base = figures.get("llama-3.2-1b")
    if base:
        for name, by_batch in figures.items():
            for batch, ratio in by_batch.items():
                rel = ratio / base[batch]
                RESULTS["speed"][name][batch]["vs_llama"] = rel
                log(
                    f"{name} ÷ llama-3.2-1b at batch {batch}: {ratio:.2f}x / {base[batch]:.2f}x "
                    f"= {rel:.3f} (goal <= 1.10)"
                )


def memory(models: list[str], lengths: tuple[int, ...] = (4096, 8192, 32768)) -> None:
    """The static cache's KV bytes a row, bf16, its sliding-window layers as rings of their
    window's columns against rows of max_len in every layer (buffers on the meta device: sizes
    only, nothing allocated)."""
    from chatqueue.engine.hf.static.decode import kv_shape
    from chatqueue.engine.hf.static.families import plan_for
    from chatqueue.engine.hf.static.slots import KvSlots

    for name in models:
        config = shaped(name, quick=False)
        with torch.device("meta"):
            model = getattr(transformers, MODEL_CLASSES[name])(config).to(torch.bfloat16)
        for max_len in lengths:
            windows = [layer.window for layer in plan_for(model, max_len).layers]
            sizes = {}
            for how, given in (("rings", windows), ("full rows", [])):
                slots = KvSlots(
                    shape=kv_shape(model, max_len),
                    max_batch=1,
                    max_len=max_len,
                    dtype=torch.bfloat16,
                    device=torch.device("meta"),
                    windows=given,
                )
                sizes[how] = slots.nbytes
            ratio = sizes["rings"] / sizes["full rows"]
            RESULTS.setdefault("kv_bytes_a_row", {})[f"{name}@{max_len}"] = sizes
            log(
                f"{name} at max_len {max_len}: KV a row {sizes['rings'] / 2**20:.1f} MiB with "
                f"rings, {sizes['full rows'] / 2**20:.1f} MiB as full rows: {ratio:.3f} "
                f"({1 / ratio:.2f}x the rows in the same memory)"
            )


def main() -> None:
    global PROMPT_TOKENS
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="2-layer shapes, small batches")
    ap.add_argument("--parts", default="correctness,speed")
    ap.add_argument("--models", default=",".join(MODEL_CLASSES), help="shapes to time")
    ap.add_argument("--families", default="", help="model types to check (default: all)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--out", default=None, help="write the figures as JSON into this folder")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=PROMPT_TOKENS,
        help="speed: each sequence's prompt (past 512, Gemma-3-1B's windows bind: its rings)",
    )
    args = ap.parse_args()
    PROMPT_TOKENS = args.prompt_tokens
    RESULTS["prompt_tokens"] = PROMPT_TOKENS
    device = args.device
    # the regions' lines: compiled ahead of time and saved, or "failed; JIT instead"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chatqueue.engine.hf.static.regions").setLevel(logging.INFO)
    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}"
    )
    compile = {"auto": device == "cuda", "on": True, "off": False}[args.compile]
    began = time.perf_counter()
    ok = True
    parts = args.parts.split(",")
    if "correctness" in parts:
        with tempfile.TemporaryDirectory() as cache:
            ok = correctness(
                device, compile, [f for f in args.families.split(",") if f], Path(cache)
            )
    if "speed" in parts:
        speed(device, args.quick, args.models.split(","))
    if "memory" in parts:
        memory(args.models.split(","))
    RESULTS["seconds"] = time.perf_counter() - began
    log(f"done in {RESULTS['seconds']:.0f} s; all families equal to generate(): {ok}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_families.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
