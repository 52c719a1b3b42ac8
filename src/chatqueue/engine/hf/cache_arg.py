"""The name under which a transformers model's forward takes its KV cache.

transformers 5.2x renamed `past_key_values` to `cache` and warns that the old name goes away in
5.40; earlier 5.x releases know only `past_key_values`. The runners pass the cache under whichever
name this model's forward declares, so they run on both without the warning."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import PreTrainedModel


def cache_kwarg(model: PreTrainedModel) -> str:
    # inspect.signature follows the deprecation decorator's __wrapped__ to the real forward
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """`model(**with_cache(model, cache), ...)` passes `cache` under the forward's own name."""
    return {cache_kwarg(model): cache}
