"""The two forward passes a runner makes: prefill new prompts, decode one token for a KV batch."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from chatqueue.engine.hf.cache_arg import cache_kwarg
from chatqueue.engine.hf.kv_batch import KVBatch, make_growing
from chatqueue.engine.hf.sampling import Sampled, SamplingBatch, SamplingRequest
from chatqueue.engine.runner import NewSequence


class Forward:
    """Runs `model` on KV batches. Must be called under `torch.inference_mode()`."""

    def __init__(self, model: PreTrainedModel, *, spliceable: bool) -> None:
        self.model = model
        # A batch that rows join and leave needs plain per-column KV tensors in every layer: a
        # config-less DynamicCache gives that (sliding windows still apply, through the mask).
        # Sequences that never share a batch keep whatever cache the model's config asks for.
        self._spliceable = spliceable
        self.device = model.device
        # Most HF causal LMs can skip the lm_head on all but the last position; older ones cannot.
        self._keeps_last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_name = cache_kwarg(model)

    def prefill(
        self, sequences: Sequence[NewSequence], *, masks: Sequence[bytes | None] | None = None
    ) -> tuple[KVBatch, Sampled]:
        """Prefill the prompts together, left-padded to the longest; sample each one's first token."""
        lengths = [len(s.prompt_ids) for s in sequences]
        assert min(lengths) > 0, "a prompt must hold at least one token"
        width = max(lengths)
        input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
        attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, width - lengths[row] :] = torch.tensor(list(seq.prompt_ids))
            attention_mask[row, width - lengths[row] :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        attention_mask = attention_mask.to(self.device)
        cache = DynamicCache() if self._spliceable else DynamicCache(config=self.model.config)
        logits = self._last_logits(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask,
            position_ids=position_ids.to(self.device),
            cache=cache,
        )
        if self._spliceable:
            make_growing(cache)
        requests = [SamplingRequest(s.params, s.prompt_ids) for s in sequences]
        sampling = SamplingBatch.create(requests, vocab_size=logits.shape[-1], device=self.device)
        sampled = sampling.sample(logits, masks=masks)
        batch = KVBatch.create(
            rids=[s.rid for s in sequences],
            cache=cache,
            attention_mask=attention_mask,
            lengths=lengths,
            pending=sampled.tokens,
            sampling=sampling,
        )
        return batch, sampled

    def decode(self, batch: KVBatch, *, masks: Sequence[bytes | None] | None = None) -> Sampled:
        """Feed every row's pending token at its own position; sample and return the next ones."""
        logits = self._last_logits(
            input_ids=batch.pending.unsqueeze(1),
            attention_mask=batch.open_column(),
            position_ids=batch.positions.unsqueeze(1),
            cache=batch.cache,
        )
        sampled = batch.sampling.sample(logits, masks=masks)
        batch.advance(sampled.tokens)
        return sampled

    def _last_logits(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        extra: dict[str, object] = {"logits_to_keep": 1} if self._keeps_last_only else {}
        extra[self._cache_name] = cache
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **extra,
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits
