"""Build a transformers ModelRunner from local files only: the default GGUF model (converted once into
the cache), or any HF model folder. The tokenizer is not loaded here: the server loads its own
(`text/hf_tokenizer.py`), and the model may live in another process."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Offline before transformers is imported: huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from chatqueue.config import Settings, parse_memory
from chatqueue.engine.hf.device import resolve_device, resolve_dtype, warm_device
from chatqueue.engine.hf.kv_batch import UnsupportedCache
from chatqueue.engine.hf.paged import HFPagedRunner, check_paged_supported, num_blocks_for
from chatqueue.engine.hf.paged.decode import DecodeOptions
from chatqueue.engine.hf.paged.pool import KVShape
from chatqueue.engine.hf.runner import HFBatchedRunner, HFSequentialRunner
from chatqueue.engine.hf.static import StaticCacheRunner, UnsupportedModel, check_supported
from chatqueue.engine.hf.static.attention import triton_attention
from chatqueue.engine.hf.static.families import plan_for
from chatqueue.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def load_model_runner(settings: Settings, folder: Path) -> ModelRunner:
    """The runner Settings ask for, over the model in `folder`.

    `kv_cache`:
    - "paged": the paged KV pool (prefix reuse, admission by blocks) for models whose layers are
      full attention or sliding windows, its decode rows through the family's decode step apart
      from prefill (`paged/decode.py`; compiled and captured as CUDA graphs on CUDA), where the
      family has one;
    - "static": slots of a fixed-size cache, decode captured as CUDA graphs on a GPU, chunked
      prefill (the families in `static/families.py`, sliding windows and soft-capping too);
    - "dynamic": any model: paged where its layers allow (decode rows packed with the prompts
      into the model's forward), else the right-aligned batch;
    - "auto": on CUDA paged where the family has a decode step, its layers are all full
      attention without soft-capping and the packed prompt steps' Triton kernel runs
      (`paged/packed.py`), else static where the family allows, else dynamic (a log line says
      why); on a CPU, dynamic.
    `attention` (the decode step): "triton" reads only the positions each row holds (CUDA),
    "sdpa" all of them under a mask, "auto" Triton where it runs."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    batching = settings.batching == "on"
    began = time.perf_counter()
    model = load_model(folder, device=device, dtype=dtype)
    log.info(
        "loaded %s on %s as %s in %.1f s (batching %s)",
        folder.name,
        device,
        dtype,
        time.perf_counter() - began,
        settings.batching,
    )
    max_len = min(settings.max_model_len or 4096, _context_window(model))
    runner: StaticCacheRunner | HFPagedRunner | HFBatchedRunner | HFSequentialRunner
    kind = "sequential"
    if batching:
        triton_runs = _packed_kernel_runs(settings.attention, device, model)
        kind = _runner_kind(settings.kv_cache, model, device, max_len, triton_runs=triton_runs)
    if kind == "static":
        runner = StaticCacheRunner(
            model=model,
            max_batch=settings.max_concurrent,
            max_len=max_len,
            prefill_chunk=settings.prefill_chunk,
            attention=settings.attention,
            compile_cache=_compile_cache(settings),
        )
    elif kind == "paged":
        runner = paged_runner(settings, model, max_len=max_len, decode_apart=True)
    elif kind == "paged-packed":
        runner = paged_runner(settings, model, max_len=max_len, decode_apart=False)
    elif kind == "batched":
        runner = HFBatchedRunner(model)
    else:
        runner = HFSequentialRunner(model)
    log_choice(runner.info)
    return runner


def _runner_kind(
    kv_cache: str,
    model: PreTrainedModel,
    device: torch.device,
    max_len: int,
    *,
    triton_runs: bool,
) -> str:
    """ "static", "paged" (its decode step apart, compiled and graphed on CUDA), "paged-packed"
    (decode rows packed with the prompts into the model's forward) or "batched".
    `triton_runs`: the Triton attention kernels run here, for this model."""
    paged_why = _why_not(check_paged_supported, model)
    step_why = _why_not(lambda m: check_supported(m, max_len), model)
    if kv_cache == "static":
        check_supported(model, max_len)
        return "static"
    if kv_cache == "paged":
        check_paged_supported(model)
        if step_why:
            log.info(
                "no paged decode step for this model (%s): decode packed with prefill", step_why
            )
            return "paged-packed"
        return "paged"
    if kv_cache == "auto" and step_why:
        log.info(
            "static KV cache off, the dynamic runner serves instead (no decode step): %s", step_why
        )
    elif kv_cache == "auto" and device.type == "cuda":
        # NOTE: the pool where its prompt steps run packed through the compiled step (Triton):
        # on an H100 its decode steps matched the static cache's and it served 64 and 256
        # requests arriving together 1.4-1.5x as fast; its prompt steps through the model's
        # eager forward instead were many times slower (benchmarks/RESULTS.md, issue 14).
        # A windowed or soft-capped model runs on the pool too (`--kv-cache paged`), but its
        # speed there is not yet the static cache's (Gemma-3-1B's decode step 1.15x at batch
        # 1 on an H100), whose windowed layers also keep only their window: the static cache.
        windowed = _windowed(model, max_len)  # the family has a decode step: step_why is None
        if paged_why is None and triton_runs and not windowed:
            return "paged"
        why = paged_why or (
            "sliding windows or soft-capped scores: the static cache keeps only each window"
            if windowed
            else "the Triton attention kernels cannot run here"
        )
        log.info("paged KV cache off on CUDA (%s): the static cache serves", why)
        return "static"
    if paged_why:
        log.info("paged KV cache off (%s): batching without prefix reuse", paged_why)
        return "batched"
    return "paged-packed"


def _windowed(model: PreTrainedModel, max_len: int) -> bool:
    """Some layer slides over a window shorter than `max_len`, or scores are soft-capped."""
    plan = plan_for(model, max_len)
    return plan.windows != [None] or plan.attn_softcap is not None


def _packed_kernel_runs(attention: str, device: torch.device, model: PreTrainedModel) -> bool:
    try:
        return triton_attention(attention, device, KVShape.of(model).head_dim) is not None
    except ValueError:
        return False


def _why_not(check: Callable[[PreTrainedModel], None], model: PreTrainedModel) -> str | None:
    try:
        check(model)
    except (UnsupportedCache, UnsupportedModel) as exc:
        return str(exc)
    return None


def _compile_cache(settings: Settings) -> Path:
    return settings.cache / "compile" / "regions"


def paged_runner(
    settings: Settings, model: PreTrainedModel, *, max_len: int, decode_apart: bool
) -> HFPagedRunner:
    """`decode_apart`: the decode rows through the family's decode step (compiled and graphed
    on CUDA), sequences at most `max_len` tokens; else packed with the prompts."""
    memory = settings.kv_cache_memory
    num_blocks = num_blocks_for(
        model,
        block_size=settings.kv_block_size,
        blocks=settings.kv_cache_blocks,
        memory=None if memory is None else parse_memory(memory),
        max_concurrent=settings.max_concurrent,
        context_window=max_len if decode_apart else _context_window(model),
    )
    decode = None
    if decode_apart:
        decode = DecodeOptions(
            max_batch=settings.max_concurrent,
            attention=settings.attention,
            compile_cache=_compile_cache(settings),
        )
    return HFPagedRunner(
        model,
        num_blocks=num_blocks,
        block_size=settings.kv_block_size,
        prefill_chunk=settings.prefill_chunk,
        prefix_caching=settings.prefix_caching == "on",
        prefill_stall_limit=settings.prefill_stall_limit or None,
        context_window=max_len if decode_apart else None,
        decode=decode,
    )


def log_choice(info: dict[str, Any]) -> None:
    """One line that says what serves: the runner, attention kernel, cache, dtype and graphs."""
    cache = dict(info.get("cache", {}))
    size = cache.pop("bytes", None)
    layout = cache.pop("layout", "?")
    details = ", ".join(f"{k} {v}" for k, v in cache.items() if v not in (None, []))
    log.info(
        "runner %s for %s: attention %s, cache %s (%s%s), dtype %s, CUDA graphs at batch sizes %s",
        info.get("runner"),
        info.get("model_type"),
        info.get("attention"),
        layout,
        details,
        f", {size / 2**30:.2f} GiB" if size is not None else "",
        info.get("dtype"),
        info.get("cuda_graph_batch_sizes") or "none",
    )


def prepare_process(settings: Settings, folder: Path) -> None:
    """Make ready what loading the model in `folder` will need, without its weights: the model
    class's module, and on a GPU the CUDA context, cuBLAS and the compiler's modules.

    NOTE: a spare model process runs this ahead of need. After a SIGKILL on an H200 these took
    ~9 s of the restart between noticing the death and loading the weights (0.6 s); in a spare
    they are done before the death."""
    began = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    _ = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # imports its modeling module
    if resolve_device(settings.device).type == "cuda":
        # the compiler's modules, which loading the compiled regions imports too
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor.compile_fx")
        warm_device(settings.device, settings.dtype)  # done already where a thread did it
    log.debug("model process prepared in %.1f s", time.perf_counter() - began)


def _context_window(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 4096))


def load_model(folder: Path, *, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    # from_pretrained returns the model in eval mode; device_map places weights as they load.
    # NOTE: use_kernels=False: transformers 5.2x swaps layers for "hub kernels" by default, which
    # it fetches from the Hugging Face Hub; offline (as chatqueue always loads) that failed every
    # GPU load with transformers 5.25, and the runners replace the model's forward anyway.
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        device_map=str(device),
        local_files_only=True,
        use_kernels=False,
        **_attention_implementation(folder),
    )
    return model


def _attention_implementation(folder: Path) -> dict[str, str]:
    """Eager attention for a model whose attention scores are soft-capped (Gemma2).

    NOTE: transformers before 5.2x ran Gemma2 on SDPA by default, which drops the soft-capping
    without a word (5.25 refuses SDPA for it). Its prefill would then differ from the static
    decode, which always soft-caps, as the model was trained."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config()
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return {"attn_implementation": "eager"}
    return {}
