"""The fast path: a static KV cache (slots.py), the decode step of the model's family (decode.py,
families.py) captured as CUDA graphs at a set of batch sizes (graphs.py), and chunked prefill
(prefill.py).

A step frees the rows released, decodes every row one token, then prefills; a prompt whose prefill
ends joins the decode from the next step, its first token sampled here."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.sampling import Sampled, SamplingBatch, SamplingRequest, step_output
from chatqueue.engine.hf.static.attention import SlotAttention
from chatqueue.engine.hf.static.decode import DecodeStep, attention_scale, kv_shape
from chatqueue.engine.hf.static.families import check_supported, plan_for
from chatqueue.engine.hf.static.graphs import DecodeGraphs
from chatqueue.engine.hf.static.prefill import Prefilled, PrefillQueue
from chatqueue.engine.hf.static.slots import KvSlots
from chatqueue.engine.runner import StepBatch, StepOutput, row_masks


class StaticCacheRunner:
    def __init__(
        self,
        *,
        model: PreTrainedModel,
        max_batch: int,
        max_len: int,
        prefill_chunk: int = 512,
        use_cuda_graphs: bool | None = None,
        compile: bool | None = None,
        attention: str = "auto",
        compile_cache: Path | None = None,
    ) -> None:
        """`attention`: "triton" reads only the columns each row holds (CUDA only), "sdpa" all
        of them under a mask; "auto" is Triton where it can run. `compile_cache`: where the
        compiled decode regions are kept for the next process (None: compiled anew)."""
        check_supported(model, max_len)
        self.model = model
        self.max_batch = max_batch
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        plan = plan_for(model, max_len)
        self.slots = KvSlots(
            shape=kv_shape(model, max_len),
            max_batch=max_batch,
            max_len=max_len,
            dtype=model.dtype,
            device=self.device,
            windows=[layer.window for layer in plan.layers],
        )
        graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        wants_compile = self.device.type == "cuda" if compile is None else compile
        slot_attention = SlotAttention(
            self.slots,
            choice=attention,
            num_heads=plan.num_heads,
            scale=attention_scale(model, max_len),
            softcap=plan.attn_softcap,
        )
        self.decode = DecodeStep(
            model,
            self.slots,
            slot_attention,
            max_len=max_len,
            compile=wants_compile,
            compile_cache=compile_cache,
        )
        self._sampling: SamplingBatch | None = None  # one row per slot row, in the same order
        self._prefills = PrefillQueue(model, chunk=prefill_chunk)
        self.graphs = DecodeGraphs(
            self.decode.forward, max_batch=max_batch, smallest=2 if graphs or wants_compile else 1
        )
        if graphs:
            self.graphs.capture()
            self.slots.reset()

    @property
    def num_compactions(self) -> int:
        return self.slots.num_compactions

    @property
    def info(self) -> dict[str, Any]:
        """What was chosen, for the start-up log and /v1/models."""
        plan, shape = self.decode.plan, self.slots.shape
        windows = sorted({w for w in (layer.window for layer in plan.layers) if w is not None})
        return {
            "runner": "static",
            "model_type": plan.model_type,
            "attention": self.decode.attention_kernel,
            "compiled": self.decode.compiled,
            "cache": {
                "layout": "static slots: a row of max_len columns per running sequence, "
                "a ring of W where a layer slides over W",
                "rows": self.max_batch,
                "max_len": self.max_len,
                "layers": shape.num_layers,
                "kv_heads": shape.kv_heads,
                "head_dim": shape.head_dim,
                "bytes": self.slots.nbytes,
                "sliding_windows": windows,
                "ring_layers": sum(n < self.max_len for n in self.slots.lengths),
            },
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "cuda_graph_batch_sizes": sorted(self.graphs.captured),
        }

    # -- the ModelRunner contract ---------------------------------------------------------
    @property
    def context_window(self) -> int:
        return self.max_len

    def step(self, batch: StepBatch) -> StepOutput:
        with torch.inference_mode():
            self._release(batch.released)
            held = set(self.slots.rids) | self._prefills.rids
            assert held == set(batch.running), f"running {batch.running} != held {sorted(held)}"
            assert len(held) + len(batch.new) <= self.max_batch, "more sequences than slots"
            self._prefills.add(batch.new)
            parts: list[tuple[list[int], Sampled]] = []
            if self.slots.rids:
                parts.append((list(self.slots.rids), self._decode(batch)))
            for prefilled in self._prefills.run_some():
                parts.append(self._join(prefilled, batch))
            return step_output(parts)

    def close(self) -> None:
        self.graphs.clear()
        self.slots.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the phases of a step -------------------------------------------------------------
    def _release(self, released: Sequence[int]) -> None:
        gone = set(released)
        self._prefills.release(gone)
        before = list(self.slots.rids)
        self.slots.release(gone)
        if self._sampling is not None and self.slots.rids != before:
            # the sampling rows follow the KV rows' new packed order
            keep = [before.index(rid) for rid in self.slots.rids]
            self._sampling = self._sampling.select(keep) if keep else None

    def _decode(self, batch: StepBatch) -> Sampled:
        self.slots.compact_if_full()
        n = len(self.slots.rids)
        logits = self.graphs.run(n)
        self.slots.stepped()
        assert self._sampling is not None
        # NOTE: the mask goes on the graph's logits, outside the graph (it changes every step)
        masks = row_masks(batch, self.slots.rids)
        sampled = self._sampling.sample(logits[:n], masks=masks)
        self.slots.ids[:n].copy_(sampled.tokens)
        return sampled

    def _join(self, prefilled: Prefilled, batch: StepBatch) -> tuple[list[int], Sampled]:
        """Sample each prefilled sequence's first token and give it a row."""
        news, logits = prefilled.sequences, prefilled.logits
        requests = [SamplingRequest(new.params, new.prompt_ids) for new in news]
        joining = SamplingBatch.create(requests, vocab_size=logits.shape[-1], device=self.device)
        sampled = joining.sample(logits, masks=row_masks(batch, [new.rid for new in news]))
        for new, cache, token in zip(news, prefilled.caches, sampled.tokens, strict=True):
            self.slots.add(new, cache, token)
        self._sampling = joining if self._sampling is None else self._sampling.concat(joining)
        return [new.rid for new in news], sampled
