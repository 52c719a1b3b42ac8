"""Runners over a transformers causal LM: continuous batching, and one-sequence-at-a-time for comparison.

NOTE: a step frees `released` rows, decodes every running row one token, then prefills `new` and
splices them into the batch. New sequences get their first token from the prefill, so they join
the decode from the next step on; nobody waits for the batch to drain. Sampled ids cross to the host
once per step, in one `.tolist()`.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.forward import Forward
from chatqueue.engine.hf.kv_batch import KVBatch
from chatqueue.engine.hf.sampling import Sampled, step_output
from chatqueue.engine.runner import StepBatch, StepOutput, row_masks


class _HFRunner:
    """A ModelRunner over any transformers causal LM (the dynamic cache)."""

    _spliceable: ClassVar[bool]  # rows of one cache join and leave (batched), or never do

    def __init__(self, model: PreTrainedModel, *, context_window: int | None = None) -> None:
        self._forward = Forward(model, spliceable=self._spliceable)
        self._start()
        self._context_window = context_window or _context_window_of(model)

    def _start(self) -> None:
        """Set up the per-sequence state (the runner is empty)."""
        raise NotImplementedError

    @property
    def model(self) -> PreTrainedModel:
        return self._forward.model

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def info(self) -> dict[str, Any]:
        """What was chosen, for the start-up log and /v1/models."""
        model = self.model
        return {
            "runner": "dynamic (continuous batching)" if self._spliceable else "sequential",
            "model_type": model.config.model_type,
            "attention": f"the model's own ({model.config._attn_implementation})",
            "cache": {"layout": "transformers DynamicCache, growing with each sequence"},
            "dtype": str(model.dtype).removeprefix("torch."),
            "cuda_graph_batch_sizes": [],
        }

    def close(self) -> None:
        device = self._forward.device
        del self._forward
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


class HFBatchedRunner(_HFRunner):
    """Continuous batching: all running sequences decode in one forward pass over one KV batch."""

    _spliceable = True
    _batch: KVBatch | None

    def _start(self) -> None:
        self._batch = None

    def step(self, batch: StepBatch) -> StepOutput:
        self._release(batch.released)
        held = self._batch.rids if self._batch is not None else []
        assert sorted(held) == sorted(batch.running), (
            f"running {sorted(batch.running)} != sequences held {sorted(held)}"
        )
        parts: list[tuple[list[int], Sampled]] = []
        with torch.inference_mode():
            if self._batch is not None:
                masks = row_masks(batch, self._batch.rids)
                parts.append((self._batch.rids, self._forward.decode(self._batch, masks=masks)))
            if batch.new:
                masks = row_masks(batch, [new.rid for new in batch.new])
                joining, sampled = self._forward.prefill(batch.new, masks=masks)
                parts.append((joining.rids, sampled))
                self._batch = joining if self._batch is None else self._batch.concat(joining)
            return step_output(parts)

    def _release(self, released: Sequence[int]) -> None:
        if self._batch is None:
            return
        gone = set(released)
        keep = [row for row, rid in enumerate(self._batch.rids) if rid not in gone]
        if len(keep) == len(self._batch):
            return
        with torch.inference_mode():
            self._batch = self._batch.select(keep) if keep else None


class HFSequentialRunner(_HFRunner):
    """Each sequence keeps its own cache and runs its own batch-1 forward, one after another."""

    _spliceable = False
    _sequences: dict[int, KVBatch]

    def _start(self) -> None:
        self._sequences = {}

    def step(self, batch: StepBatch) -> StepOutput:
        for rid in batch.released:
            self._sequences.pop(rid, None)
        assert sorted(self._sequences) == sorted(batch.running), (
            f"running {sorted(batch.running)} != sequences held {sorted(self._sequences)}"
        )
        parts: list[tuple[list[int], Sampled]] = []
        with torch.inference_mode():
            for rid in batch.running:
                masks = row_masks(batch, [rid])
                parts.append(([rid], self._forward.decode(self._sequences[rid], masks=masks)))
            for new in batch.new:
                alone, sampled = self._forward.prefill([new], masks=row_masks(batch, [new.rid]))
                self._sequences[new.rid] = alone
                parts.append(([new.rid], sampled))
            return step_output(parts)


def _context_window_of(model: PreTrainedModel) -> int:
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "max_position_embeddings", None)
    assert isinstance(window, int), "the model config names no max_position_embeddings"
    return window
