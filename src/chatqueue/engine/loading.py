"""What a model process calls to load its runner (module-level functions, so that the process
can unpickle them), and what it prepares ahead of its load.

NOTE: this module imports no torch, transformers or server code at import time. A model process
unpickles these functions before its heavy imports are timed, and the server imports this module
too; each heavy import happens inside the function that needs it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chatqueue.config import Settings
from chatqueue.engine.process import Load, ModelProcess, Preload

if TYPE_CHECKING:
    from chatqueue.engine.runner import ModelRunner


def hf_preload(settings: Settings, folder: Path) -> Preload:
    """What a model process for the transformers runner over `folder` imports and prepares."""
    return Preload(
        ("torch", "transformers", "chatqueue.engine.hf.loader"),
        prepare=functools.partial(prepare_hf_process, settings, str(folder)),
        beside=functools.partial(warm_hf_device, settings),
    )


def hf_load(settings: Settings, folder: Path) -> Callable[[], ModelRunner]:
    """The transformers runner's load over `folder`, as a model process unpickles it (one maker:
    a head-started process and a restarted one load the same)."""
    return functools.partial(load_hf_runner, settings, str(folder))


def head_start(settings: Settings) -> ModelProcess | None:
    """`chatqueue serve --model DIR` (a Hugging Face folder) with the model in its own process:
    that process started first thing, before the server's own imports, and asked for the model
    at once; the server's load takes it over (`api/build.py`). None where no such process will
    serve: the mock engine, `--model-process off`, or a GGUF (converted, once, by the load).

    NOTE: the model process's imports are most of a warm start (9 of 15 s on an H100); each
    second the server spends on its own before starting it adds to the start."""
    if settings.model_process == "off" or settings.engine not in ("auto", "hf"):
        return None
    if settings.model is None or not Path(settings.model, "config.json").expanduser().is_file():
        return None
    folder = Path(settings.model).expanduser()
    started = ModelProcess(hf_preload(settings, folder))
    started.ask(Load(hf_load(settings, folder), settings.log_level))
    return started


def prepare_hf_process(settings: Settings, folder: str) -> None:
    """In a model process before its `Load` (a spare's ahead of need): what a load would do
    first and needs no weights."""
    use_compile_cache(settings.cache)
    from chatqueue.engine.hf.loader import prepare_process

    prepare_process(settings, Path(folder))


def warm_hf_device(settings: Settings) -> None:
    """The GPU's context and a cuBLAS handle, on a thread while the model process imports."""
    from chatqueue.engine.hf.device import warm_device

    warm_device(settings.device, settings.dtype)


def load_hf_runner(settings: Settings, folder: str) -> ModelRunner:
    """The model runner (module-level, so the model process can unpickle it)."""
    use_compile_cache(settings.cache)
    import torch

    from chatqueue.engine.hf.loader import load_model_runner

    torch.set_num_threads(settings.torch_threads or default_torch_threads())
    return load_model_runner(settings, Path(folder))


def load_llamacpp_runner(settings: Settings, gguf: str) -> ModelRunner:
    """The llama.cpp runner (module-level, so the model process can unpickle it)."""
    import torch

    from chatqueue.engine.llamacpp import loader

    threads = settings.torch_threads or default_torch_threads()
    # torch only samples here: its idle OpenMP threads would spin on the cores the model needs
    torch.set_num_threads(threads)
    return loader.load_llamacpp_runner(settings, Path(gguf), threads=threads)


def default_torch_threads() -> int:
    """Every core but one, which the event loop and the tokenizer need.
    NOTE: measured on 2 vCPUs (benchmarks/RESULTS.md, issue 3): 1 torch thread served 1.5x the
    tokens/s of 2 and halved the event loop's p99 lag, since a second OpenMP thread only fought
    the event loop for the other core."""
    return max(1, (os.cpu_count() or 1) - 1)


def use_compile_cache(cache: Path) -> None:
    """Keep Inductor's and Triton's caches in chatqueue's cache folder (unless the environment
    names others), before torch reads where they are.

    NOTE: why. On a GPU the static runner compiles its decode step and captures it as CUDA
    graphs; a cold start of a 1B model spent ~100 s of its 121 s there. With the compiled code
    kept beside the converted models, a restart of the model process and a second start of the
    same model reuse it (benchmarks/RESULTS.md: cold and warm starts), and it outlives a /tmp
    that is cleaned at boot."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "compile" / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "compile" / "triton"))
