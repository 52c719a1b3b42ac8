"""The fast path for Llama-family models: a static KV cache, decode captured as CUDA graphs,
chunked prefill."""

from chatqueue.engine.hf.static.llama import UnsupportedModel, check_supported
from chatqueue.engine.hf.static.runner import StaticCacheRunner

__all__ = ["StaticCacheRunner", "UnsupportedModel", "check_supported"]
