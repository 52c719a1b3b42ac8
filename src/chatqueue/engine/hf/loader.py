"""Build a transformers runner from local files only: the default GGUF model, or any HF model folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Offline before transformers is imported: huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from chatqueue.engine.hf.gguf_cache import (
    DEFAULT_MODEL_NAME,
    ModelNotFound,
    default_model_folder,
)
from chatqueue.engine.hf.runner import HFBatchedRunner, HFSequentialRunner
from chatqueue.engine.hf.static_runner import StaticCacheRunner, UnsupportedModel, check_supported
from chatqueue.engine.hf.tokenizer import HFTokenizer
from chatqueue.engine.runner import Runner

log = logging.getLogger(__name__)


def load_hf_runner(
    *,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batching: bool = True,
    chat_template: str | None = None,
    cache_dir: Path | None = None,
    kv_cache: str = "auto",
    max_batch: int = 8,
    max_model_len: int | None = None,
    prefill_chunk: int = 512,
    attention: str = "auto",
) -> Runner:
    """A runner for `model` (a local HF model folder; None: the default SmolLM2 GGUF, converted once
    into `cache_dir`). `chat_template` is a file holding a Jinja template, for models without one.

    `kv_cache`: "static" (slots of a fixed-size cache, decode captured as CUDA graphs on a GPU,
    chunked prefill; Llama-family models), "dynamic" (any model), or "auto": static on CUDA where
    the model allows it, else dynamic. `attention` (static cache): "triton" reads only the
    columns each row holds (CUDA), "sdpa" all of them under a mask, "auto" Triton where it runs."""
    folder = default_model_folder(cache_dir) if model is None else _local_folder(model)
    name = DEFAULT_MODEL_NAME if model is None else folder.name
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    template = Path(chat_template).read_text(encoding="utf-8") if chat_template else None
    tokenizer = load_tokenizer(folder, model_name=name, chat_template=template)
    hf_model = load_model(folder, device=torch_device, dtype=torch_dtype)
    log.info("loaded %s on %s as %s (batching %s)", name, torch_device, torch_dtype, batching)
    if batching and _wants_static(kv_cache, hf_model, torch_device):
        max_len = min(max_model_len or 4096, _context_window(hf_model))
        return StaticCacheRunner(
            model=hf_model,
            tokenizer=tokenizer,
            model_name=name,
            max_batch=max_batch,
            max_len=max_len,
            prefill_chunk=prefill_chunk,
            attention=attention,
        )
    runner_class = HFBatchedRunner if batching else HFSequentialRunner
    return runner_class(model=hf_model, tokenizer=tokenizer, model_name=name)


def _wants_static(kv_cache: str, model: PreTrainedModel, device: torch.device) -> bool:
    if kv_cache == "dynamic":
        return False
    if kv_cache == "static":
        check_supported(model, _context_window(model))
        return True
    try:
        check_supported(model, 4096)
    except UnsupportedModel as exc:
        log.info("static KV cache off: %s", exc)
        return False
    return device.type == "cuda"


def _context_window(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 4096))


def load_model(folder: Path, *, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    # from_pretrained returns the model in eval mode; device_map places weights as they load.
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=str(device), local_files_only=True
    )
    return model


def load_tokenizer(folder: Path, *, model_name: str, chat_template: str | None) -> HFTokenizer:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return HFTokenizer(
        tokenizer,
        model_name=model_name,
        eos_token_ids=_generation_eos_ids(folder),
        chat_template=chat_template,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs lack fast half-precision matmuls; GPUs want bf16, which keeps fp32's range.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    return dtypes[name]


def _local_folder(model: str) -> Path:
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{model} is not a local Hugging Face model folder (no config.json)")
    return folder


def _generation_eos_ids(folder: Path) -> set[int]:
    """EOS ids from generation_config.json, which may hold one id or a list (chat models often end
    turns with a token other than the tokenizer's eos)."""
    try:
        config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:
        return set()
    eos = config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}
