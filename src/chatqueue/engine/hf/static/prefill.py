"""Prompts through the model's own forward, each on a private cache, at most `chunk` prompt tokens a
step. The runner prefills after the step's decode: a long prompt delays the running streams by one
chunk at most."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from chatqueue.engine.hf.cache_arg import cache_kwarg
from chatqueue.engine.runner import NewSequence


@dataclass(eq=False)
class _Prefill:
    """A sequence whose prompt is going through the model chunk by chunk."""

    new: NewSequence
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0  # prompt tokens already run


@dataclass(frozen=True, slots=True)
class Prefilled:
    """Sequences whose whole prompt has been run, to join the decode together."""

    sequences: list[NewSequence]
    logits: torch.Tensor  # [len(sequences), vocab] float: after each one's last prompt token
    caches: list[DynamicCache]  # each one's prompt KV alone, as long as its prompt


class PrefillQueue:
    def __init__(self, model: PreTrainedModel, *, chunk: int) -> None:
        self._model = model
        self._cache_name = cache_kwarg(model)
        self._device = model.device
        self._chunk = chunk
        self._waiting: deque[_Prefill] = deque()

    @property
    def rids(self) -> set[int]:
        return {p.new.rid for p in self._waiting}

    def add(self, news: Sequence[NewSequence]) -> None:
        self._waiting.extend(_Prefill(new) for new in news)

    def release(self, gone: Set[int]) -> None:
        self._waiting = deque(p for p in self._waiting if p.new.rid not in gone)

    def run_some(self) -> list[Prefilled]:
        """Run up to `chunk` prompt tokens: whole prompts that fit go through one padded forward
        together; a longer one goes on alone, a chunk at a time. Returns the prompts finished, in
        the order they are to join."""
        budget, out = self._chunk, []
        group: list[_Prefill] = []
        for prefill in list(self._waiting):
            left = len(prefill.new.prompt_ids) - prefill.done
            if budget <= 0:
                break
            if prefill.done == 0 and left <= budget:
                group.append(prefill)
                budget -= left
                continue
            end = prefill.done + min(left, budget)
            logits = self._forward_chunk(prefill, prefill.done, end)
            budget -= end - prefill.done
            prefill.done = end
            if end == len(prefill.new.prompt_ids):
                out.append(self._finish([prefill], logits, [prefill.cache]))
        if group:
            out.append(self._prefill_group(group))
        return out

    def _finish(
        self, prefills: list[_Prefill], logits: torch.Tensor, caches: list[DynamicCache]
    ) -> Prefilled:
        for prefill in prefills:
            self._waiting.remove(prefill)
        return Prefilled([p.new for p in prefills], logits, caches)

    def _prefill_group(self, group: list[_Prefill]) -> Prefilled:
        """Whole prompts, left-padded into one forward; each row's KV is then its last columns."""
        lengths = [len(p.new.prompt_ids) for p in group]
        width = max(lengths)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (prefill, n) in enumerate(zip(group, lengths, strict=True)):
            ids[row, width - n :] = torch.tensor(list(prefill.new.prompt_ids))
            mask[row, width - n :] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache()
        output = self._model(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_name: cache},
        )
        caches = [_row_cache(cache, row, n) for row, n in enumerate(lengths)]
        return self._finish(group, output.logits[:, -1].float(), caches)

    def _forward_chunk(self, prefill: _Prefill, start: int, end: int) -> torch.Tensor:
        ids = torch.tensor([list(prefill.new.prompt_ids[start:end])], device=self._device)
        positions = torch.arange(start, end, device=self._device).unsqueeze(0)
        output = self._model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_name: prefill.cache},
        )
        logits: torch.Tensor = output.logits[:, -1].float()
        return logits


def _row_cache(cache: DynamicCache, row: int, length: int) -> DynamicCache:
    """One row of a left-padded batch cache: its last `length` columns."""
    one = DynamicCache()
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, DynamicLayer) and layer.keys is not None
        assert layer.values is not None
        keys = layer.keys[row : row + 1, :, -length:]
        one.update(keys, layer.values[row : row + 1, :, -length:], i)
    return one
