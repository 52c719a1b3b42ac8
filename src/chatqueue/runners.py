"""Build the runner that Settings ask for. The transformers runner is imported only when used,
so the mock engine starts without importing torch."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from chatqueue.config import Settings
from chatqueue.engine.mock import MockConfig, MockRunner
from chatqueue.engine.process_runner import ProcessRunner
from chatqueue.engine.runner import Runner


def runner_for(settings: Settings) -> Runner | Callable[[], Runner]:
    """A ready mock runner, or a factory the engine thread calls to load the model."""
    if settings.engine == "mock":
        return MockRunner(
            MockConfig(
                mode=settings.mock_mode,
                delay_s=settings.mock_delay,
                first_token_delay_s=settings.mock_first_token_delay,
                lorem_tokens=settings.mock_lorem_tokens,
                model_name=settings.served_model_name or "mock",
            )
        )

    load = functools.partial(load_hf, settings)
    if settings.model_process == "off":
        return load
    return functools.partial(ProcessRunner, load, log_level=settings.log_level)


def load_hf(settings: Settings) -> Runner:
    """The transformers runner Settings ask for (module-level, so the model process can unpickle
    it)."""
    import torch

    from chatqueue.engine.hf.loader import load_hf_runner

    torch.set_num_threads(settings.torch_threads or default_torch_threads())
    return load_hf_runner(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        batching=settings.batching == "on",
        chat_template=str(settings.chat_template) if settings.chat_template else None,
        cache_dir=settings.cache,
        kv_cache=settings.kv_cache,
        max_batch=settings.max_concurrent,
        max_model_len=settings.max_model_len,
        prefill_chunk=settings.prefill_chunk,
        attention=settings.attention,
    )


def default_torch_threads() -> int:
    """Every core but one, which the event loop and the tokenizer need.
    NOTE: measured on 2 vCPUs (benchmarks/RESULTS.md, issue 3): 1 torch thread served 1.5x the
    tokens/s of 2 and halved the event loop's p99 lag, since a second OpenMP thread only fought
    the event loop for the other core."""
    return max(1, (os.cpu_count() or 1) - 1)
