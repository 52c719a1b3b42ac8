"""Settings -> a runner and a ChatQueue. The transformers side is imported only when used, so the
mock engine starts without importing torch."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from chatqueue.api.chat_queue import ChatQueue
from chatqueue.config import Settings
from chatqueue.engine.loading import hf_load, hf_preload, load_llamacpp_runner
from chatqueue.engine.mock import MockConfig, MockRunner
from chatqueue.engine.process import Load, ModelProcess, Preload, ProcessRunner
from chatqueue.engine.runner import ModelRunner, Runner, TokenizedRunner
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.text.tool_calls import ToolCallFormat


def chat_queue_for(
    settings: Settings,
    queue_class: type[ChatQueue] = ChatQueue,
    *,
    model_process: ModelProcess | None = None,
) -> ChatQueue:
    """`model_process`: one started ahead for these settings (`engine.loading.head_start`)."""
    return queue_class(
        runner_for(settings, model_process=model_process),
        max_concurrent=settings.max_concurrent,
        max_queue_size=settings.max_queue_size,
        max_queue_per_user=settings.max_queue_per_user,
        queue_timeout_s=settings.queue_timeout,
        step_timeout_s=settings.step_timeout,
        max_model_restarts=settings.model_restarts,
        max_tokens_cap=settings.max_tokens_cap,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_unread_tokens=settings.max_unread_tokens,
        stream_interval=settings.stream_interval,
        overlap_steps=settings.overlap_steps,
        tool_call_format=None
        if settings.tool_call_format == "auto"
        else ToolCallFormat(settings.tool_call_format),
    )


def runner_for(
    settings: Settings, *, model_process: ModelProcess | None = None
) -> Runner | Callable[[], Runner]:
    """A ready mock runner, or a factory the engine thread calls to load the model."""
    if settings.engine == "mock":
        return MockRunner(
            MockConfig(
                mode=settings.mock_mode,
                delay_s=settings.mock_delay,
                first_token_delay_s=settings.mock_first_token_delay,
                lorem_tokens=settings.mock_lorem_tokens,
                model_name=settings.served_model_name or "mock",
                kv_blocks=settings.kv_cache_blocks,
                kv_block_size=settings.kv_block_size,
                prefix_caching=settings.prefix_caching == "on",
            )
        )
    if engine_for(settings) == "llamacpp":
        return functools.partial(load_llamacpp, settings)
    return functools.partial(load_hf, settings, model_process)


# NOTE: the most sequences at once for which `--engine auto` picks llama.cpp. Measured on a
# 2-vCPU AVX-512 Xeon, one thread each (benchmarks/RESULTS.md, issue 17): in-process, llama.cpp's
# decode is 3.4x the transformers runner's tokens/s at 1 sequence, 2.0x at 8, 0.81x at 32, where
# the fp32 GEMMs scale and llama.cpp's Q4_1 dot products do not. Through the server at 32 streams,
# against llama-server: llama.cpp 1.15x its tokens/s with a time to first token p50 of 210 ms
# (its 552), the transformers runner 1.31x but 1,302 ms (its 475). Issue 17 asks for both (TTFT
# no worse), so llama.cpp serves up to 32; above, its slots' KV (allocated whole at start: 12 KB
# a token, 1.6 GB at 32 x 4096) and its scaling are unmeasured, and transformers serves.
LLAMACPP_MAX_CONCURRENT = 32


def engine_for(settings: Settings) -> str:
    """`--engine auto`: llama.cpp for a GGUF (the default model is one) where it is installed, no
    NVIDIA GPU is visible (`--device cpu` counts as none) and at most LLAMACPP_MAX_CONCURRENT
    sequences run at once (the default 8 does); transformers otherwise.

    NOTE: the GPU check reads the driver's /proc entry rather than importing torch: the server
    process never imports it."""
    if settings.engine != "auto":
        return settings.engine
    from chatqueue.engine.hf.gguf_cache import is_gguf

    if not is_gguf(settings.model) or importlib.util.find_spec("llama_cpp") is None:
        return "hf"
    if settings.batching == "off" or settings.max_concurrent > LLAMACPP_MAX_CONCURRENT:
        return "hf"  # the llama.cpp runner always batches, and is slower at many sequences
    if settings.device == "cpu":
        return "llamacpp"
    return "hf" if settings.device == "cuda" or _nvidia_gpu_visible() else "llamacpp"


def _nvidia_gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", "all").strip() in ("", "-1"):
        return False  # hidden from CUDA, as torch would see it
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def load_hf(settings: Settings, started: ModelProcess | None = None) -> Runner:
    """On the engine thread: find the model's folder (converting the default GGUF once), load the
    tokenizer in this process, and the model here or in its own process (`started`: one started
    earlier for these settings, `engine/loading.py`'s head start)."""
    from chatqueue.engine.hf.gguf_cache import model_folder

    folder, name = model_folder(settings.model, settings.cache)
    return _with_model(
        settings,
        folder,
        name,
        load=hf_load(settings, folder),
        preload=hf_preload(settings, folder),
        started=started,
    )


def load_llamacpp(settings: Settings) -> Runner:
    """On the engine thread: the GGUF and its tokenizer (converted once, on its own), the
    tokenizer loaded here, the model through llama.cpp here or in its own process."""
    from chatqueue.engine.hf.gguf_cache import gguf_model

    gguf, folder, name = gguf_model(settings.model, settings.cache)
    return _with_model(
        settings,
        folder,
        name,
        load=functools.partial(load_llamacpp_runner, settings, str(gguf)),
        preload=Preload(("torch", "llama_cpp", "chatqueue.engine.llamacpp.loader")),
    )


def _with_model(
    settings: Settings,
    folder: Path,
    name: str,
    *,
    load: Callable[[], ModelRunner],
    preload: Preload,
    started: ModelProcess | None = None,
) -> Runner:
    """The tokenizer of `folder` loaded in this process, and `load()` here or in a model process."""
    name = settings.served_model_name or name
    if settings.model_process == "off":
        assert started is None, "a model process was started for settings that run none"
        return TokenizedRunner(load(), _tokenizer(settings, folder, name), name)
    # NOTE: the model process starts first: its imports and the GPU's preparation (~19 s on an
    # H200 machine) overlap the tokenizer's here (~5 s: transformers, torch). It is asked for
    # the model at once: were the tokenizer slower than its preparation, it would not wait.
    started = started or ModelProcess(preload)
    try:
        started.ask(Load(load, settings.log_level))
        tokenizer = _tokenizer(settings, folder, name)
    except BaseException:
        started.kill()
        raise
    return ProcessRunner(
        load,
        tokenizer=tokenizer,
        model_name=name,
        log_level=settings.log_level,
        preload=preload,
        started=started,
    )


def _tokenizer(settings: Settings, folder: Path, name: str) -> Tokenizer:
    from chatqueue.text.hf_tokenizer import load_tokenizer

    template = (
        settings.chat_template.read_text(encoding="utf-8") if settings.chat_template else None
    )
    return load_tokenizer(folder, model_name=name, chat_template=template)
