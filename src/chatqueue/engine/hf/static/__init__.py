"""The fast path: a static KV cache, the decode step of each supported family captured as CUDA
graphs, chunked prefill."""

from chatqueue.engine.hf.static.families import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedModel,
    check_supported,
)
from chatqueue.engine.hf.static.runner import StaticCacheRunner

__all__ = ["SUPPORTED_MODEL_TYPES", "StaticCacheRunner", "UnsupportedModel", "check_supported"]
