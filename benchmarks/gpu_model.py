"""A Llama-3.2-1B-shaped model with random bf16 weights (no hub: the same model on both sides of
every comparison), and a stand-in tokenizer whose prompts are N fixed random token ids.

Run as a script it serves that model over HTTP, for the server half of bench_gpu.py:
    python benchmarks/gpu_model.py --port 8000 --max-concurrent 64 [--model-process off]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatqueue.types import ChatMessage

PROMPT_TOKENS = 256


def llama_1b_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128001,
    )


def small_config() -> LlamaConfig:
    """The same family at a size a CPU runs quickly (the vocabulary stays, for the prompts)."""
    config = llama_1b_config()
    config.hidden_size, config.intermediate_size = 256, 768
    config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 4, 4, 2
    return config


def build_model(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, small: bool = False
) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        config = small_config() if small else llama_1b_config()
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


class PromptTokenizer:
    """Each conversation maps to PROMPT_TOKENS ids drawn from a seed of its text; ids decode to
    short words. Enough for the engine: it needs token ids in and text out."""

    eos_token_ids = frozenset({128001})

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        seed = int(hashlib.sha256(messages[-1].content.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1000, 120000, (PROMPT_TOKENS,), generator=g).tolist()

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(f" w{t % 1000}" for t in token_ids)


MODEL_NAME = "llama-1b-random"


def static_runner(
    model: LlamaForCausalLM,
    *,
    max_batch: int,
    max_len: int,
    chunk: int = 2048,
    attention: str = "auto",
):
    from chatqueue.engine.hf.static import StaticCacheRunner
    from chatqueue.engine.runner import TokenizedRunner

    runner = StaticCacheRunner(
        model=model,
        max_batch=max_batch,
        max_len=max_len,
        prefill_chunk=chunk,
        attention=attention,
    )
    return TokenizedRunner(runner, PromptTokenizer(), MODEL_NAME)


def paged_runner(model: LlamaForCausalLM, *, max_batch: int, max_len: int, chunk: int = 512):
    """The paged pool's runner as `--kv-cache paged` (and auto on CUDA) builds it: a block of
    KV for every position of `max_batch` sequences, the server's prefill chunk and stall limit."""
    from chatqueue.engine.hf.paged import HFPagedRunner
    from chatqueue.engine.hf.paged.decode import DecodeOptions
    from chatqueue.engine.runner import TokenizedRunner

    runner = HFPagedRunner(
        model,
        num_blocks=max_batch * -(-max_len // 16),
        block_size=16,
        prefill_chunk=chunk,
        prefill_stall_limit=2.0,
        context_window=max_len,
        decode=DecodeOptions(max_batch=max_batch),
    )
    return TokenizedRunner(runner, PromptTokenizer(), MODEL_NAME)


RUNNERS = {"static": static_runner, "paged": paged_runner}


def _log_gc_pauses(where: str, longer_than_s: float = 0.01) -> None:
    """Print each garbage collection that stops the process for longer than `longer_than_s`."""
    import gc
    import time

    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif (took := time.perf_counter() - started[0]) > longer_than_s:
            print(
                f"{where}: gc pause {took * 1e3:.0f} ms (generation {info['generation']})",
                flush=True,
            )

    gc.callbacks.append(callback)


def served_runner(max_concurrent: int, max_len: int, cpu: bool, in_child: bool, kv_cache: str):  # type: ignore[no-untyped-def]
    """The runner the server serves (in the model process, or in the server's own)."""
    if in_child:
        _log_gc_pauses("model process")
    model = build_model("cpu", torch.float32, small=True) if cpu else build_model()
    return RUNNERS[kv_cache](model, max_batch=max_concurrent, max_len=max_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-concurrent", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--cpu", action="store_true", help="the small model on the CPU")
    ap.add_argument("--model-process", choices=["on", "off"], default="on")
    ap.add_argument("--overlap-steps", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--kv-cache", choices=sorted(RUNNERS), default="static")
    ap.add_argument("--api-servers", type=int, default=1, help="HTTP processes over the queue")
    args = ap.parse_args()
    import functools

    import gpu_model  # this file by its module name: the model process unpickles from it
    from chatqueue import ChatQueue
    from chatqueue.config import Settings
    from chatqueue.engine.process.runner import ProcessRunner

    in_child = args.model_process == "on"
    load = functools.partial(
        gpu_model.served_runner,
        args.max_concurrent,
        args.max_len,
        args.cpu,
        in_child,
        args.kv_cache,
    )
    runner = (
        functools.partial(
            ProcessRunner, load, tokenizer=gpu_model.PromptTokenizer(), model_name=MODEL_NAME
        )
        if in_child
        else load
    )
    _log_gc_pauses("server process")
    cq = ChatQueue(
        runner,
        max_concurrent=args.max_concurrent,
        max_queue_size=args.max_concurrent,
        overlap_steps=args.overlap_steps,
    )
    settings = Settings(
        engine="mock", port=args.port, log_level="warning", api_servers=args.api_servers
    )
    from lag_recorder import add_lag_recorder

    if args.api_servers > 1:
        from chatqueue.fronts.launch import serve_api_servers

        serve_api_servers(settings, chat_queue=cq, on_app=add_lag_recorder)
    else:
        from chatqueue.server.serve import serve

        serve(settings, chat_queue=cq, on_app=add_lag_recorder)


if __name__ == "__main__":
    main()
