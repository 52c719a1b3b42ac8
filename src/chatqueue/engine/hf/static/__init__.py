"""The fast path for Llama-family models: a static KV cache, decode captured as CUDA graphs,
chunked prefill."""

from chatqueue.engine.hf.static.runner import StaticCacheRunner, UnsupportedModel, check_supported

__all__ = ["StaticCacheRunner", "UnsupportedModel", "check_supported"]
