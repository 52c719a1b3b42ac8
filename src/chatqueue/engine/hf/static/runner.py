"""The fast path for Llama-family models: a static KV cache, a decode step captured as CUDA graphs
at a set of batch sizes, and chunked prefill.

NOTE: how the static cache works. Every running sequence owns one row (slot) of fixed-size KV
buffers [slots, kv_heads, max_len, head_dim] per layer; the running rows are kept packed at the
front (a leaving row is replaced by the last one). All rows write their next token's KV into the
same column, `col`, which moves right one column a step; where a token sits in its sequence is its
own position id (RoPE is applied before the cache). So every row's entries are one run of columns
ending at `col`: [start, col), with its own `start`. A joining sequence's prompt is copied
right-aligned just left of `col` (moving `col` right first if the prompt is longer), rows never
wait for one another, and the decode step has the same shapes every time, which is what lets it
be captured once per batch size and replayed. When `col` reaches the end of the buffer, all rows
shift left together by the same amount (one copy a layer), until the longest starts at column 0.

Prefill runs the model's own forward on a private cache, at most `prefill_chunk` prompt tokens a
step, after the step's decode: a long prompt delays the running streams by one chunk at most.
"""

from __future__ import annotations

import bisect
import gc
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from chatqueue.engine.hf.sampling import SamplingBatch, SamplingRequest
from chatqueue.engine.runner import NewSequence, StepBatch

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


class UnsupportedModel(ValueError):
    """The static-cache runner cannot run this model; the dynamic batched runner can."""


def check_supported(model: PreTrainedModel, max_len: int) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model type {config.model_type!r} is not Llama-family")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < max_len:
        raise UnsupportedModel(f"sliding window {window} < max_len {max_len}")


@dataclass(eq=False)
class _Prefill:
    """A sequence whose prompt is going through the model chunk by chunk."""

    new: NewSequence
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0  # prompt tokens already run


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
    ) -> None:
        """`attention`: "triton" reads only the columns each row holds (CUDA only), "sdpa" all
        of them under a mask; "auto" is Triton where it can run."""
        check_supported(model, max_len)
        self.model = model
        self.max_batch = max_batch
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        config = model.config
        self._n_heads = config.num_attention_heads
        self._n_kv = config.num_key_value_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // self._n_heads
        self._vocab = config.vocab_size
        inner = model.model
        self._embed, self._layers, self._norm = inner.embed_tokens, inner.layers, inner.norm
        self._rotary, self._lm_head = inner.rotary_emb, model.lm_head
        self._scale = float(self._layers[0].self_attn.scaling)
        self._fused = [_fuse_projections(layer) for layer in self._layers]

        kv_shape = (max_batch, self._n_kv, max_len, self._head_dim)
        dtype, dev = model.dtype, self.device
        self._k = [torch.zeros(kv_shape, dtype=dtype, device=dev) for _ in self._layers]
        self._v = [torch.zeros(kv_shape, dtype=dtype, device=dev) for _ in self._layers]
        # the first column each row holds; its entries run from there to `col`
        self._start = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._columns = torch.arange(max_len, device=dev)
        self._ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._pos = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._col_t = torch.zeros(1, dtype=torch.long, device=dev)
        self._col = 0  # host mirror of _col_t
        self._rows: list[int] = []  # rid of each packed row
        self._starts: list[int] = []  # host mirror of _start for the packed rows
        self._sampling: SamplingBatch | None = None
        self._prefills: deque[_Prefill] = deque()
        self.num_compactions = 0
        self._buckets = [b for b in _BUCKETS if b < max_batch] + [max_batch]
        self._triton = _triton_attention(attention, dev, self._head_dim)
        # one split of the columns per 256: a batch of 1 still spreads over several programs
        self._num_splits = -(-max_len // 256)
        graphs = dev.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # NOTE: a decode step is mostly tiny kernels (norms, RoPE, residuals) at small batches;
        # Inductor fuses them, and the CUDA graphs then replay the fused step.
        wants_compile = dev.type == "cuda" if compile is None else compile
        self._decode_fn = (
            torch.compile(self._decode_forward, dynamic=True)
            if wants_compile
            else self._decode_forward
        )
        if graphs:
            self._capture_graphs()

    # -- the ModelRunner contract ---------------------------------------------------------
    @property
    def context_window(self) -> int:
        return self.max_len

    def step(self, batch: StepBatch) -> dict[int, int]:
        with torch.inference_mode():
            self._release(batch.released)
            held = set(self._rows) | {p.new.rid for p in self._prefills}
            assert held == set(batch.running), f"running {batch.running} != held {sorted(held)}"
            assert len(held) + len(batch.new) <= self.max_batch, "more sequences than slots"
            self._prefills.extend(_Prefill(new) for new in batch.new)
            out: dict[int, int] = {}
            if self._rows:
                out.update(zip(self._rows, self._decode().tolist(), strict=True))
            out.update(self._prefill_some())
            return out

    def close(self) -> None:
        self._graphs.clear()
        self._k.clear()
        self._v.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- rows -----------------------------------------------------------------------------
    def _release(self, released: Sequence[int]) -> None:
        gone = set(released)
        self._prefills = deque(p for p in self._prefills if p.new.rid not in gone)
        before = list(self._rows)
        for rid in [s for s in before if s in gone]:
            row, last = self._rows.index(rid), len(self._rows) - 1
            if row != last:
                self._move_row(last, row)
            self._rows.pop()
            self._starts.pop()
        if self._sampling is not None and self._rows != before:
            # the sampling rows follow the KV rows' new packed order
            keep = [before.index(rid) for rid in self._rows]
            self._sampling = self._sampling.select(keep) if keep else None

    def _move_row(self, src: int, dst: int) -> None:
        for buffers in (self._k, self._v):
            for layer in buffers:
                layer[dst].copy_(layer[src])
        for t in (self._start, self._ids, self._pos):
            t[dst].copy_(t[src])
        self._rows[dst] = self._rows[src]
        self._starts[dst] = self._starts[src]

    def _add_row(self, prefill: _Prefill, first_token: torch.Tensor) -> None:
        """Copy a prefilled prompt right-aligned just left of `col`; it decodes from next step."""
        n = len(prefill.new.prompt_ids)
        if self._col >= self.max_len:
            self._compact()
        if self._col < n:  # rows end at `col`: move them right to make room for the prompt
            self._shift(n - self._col)
        row = len(self._rows)
        start = self._col - n
        for i, layer in enumerate(prefill.cache.layers):
            assert isinstance(layer, DynamicLayer) and layer.keys is not None
            assert layer.values is not None
            self._k[i][row, :, start : self._col].copy_(layer.keys[0])
            self._v[i][row, :, start : self._col].copy_(layer.values[0])
        self._start[row] = start
        self._ids[row] = first_token
        self._pos[row] = n
        self._rows.append(prefill.new.rid)
        self._starts.append(start)

    def _set_col(self, col: int) -> None:
        self._col = col
        self._col_t.fill_(col)

    def _compact(self) -> None:
        """Shift every row left by the same amount, so the longest row starts at column 0."""
        shift = min(self._starts, default=self._col)
        assert shift > 0, "a sequence outgrew max_len"
        self._shift(-shift)
        self.num_compactions += 1
        log.debug("compacted the static cache to %s columns", self._col)

    def _shift(self, delta: int) -> None:
        """Move every row's entries `delta` columns (left if negative), `col` with them."""
        lo = max(0, -delta)
        for buffers in (self._k, self._v):
            for layer in buffers:
                layer[:, :, lo + delta : self._col + delta].copy_(
                    layer[:, :, lo : self._col].clone()
                )
        self._start.add_(delta)
        self._starts = [start + delta for start in self._starts]
        self._set_col(self._col + delta)

    # -- decode ---------------------------------------------------------------------------
    def _decode(self) -> torch.Tensor:
        if self._col >= self.max_len:
            self._compact()
        n = len(self._rows)
        bucket = self._buckets[bisect.bisect_left(self._buckets, n)]
        if bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            logits = self._decode_fn(bucket)
        self._col += 1  # the device copy moved inside the step
        assert self._sampling is not None
        tokens = self._sampling.sample(logits[:n])
        self._ids[:n].copy_(tokens)
        return tokens

    def _decode_forward(self, b: int) -> torch.Tensor:
        """One token for rows [0, b): only static buffers, no host synchronisation (capturable)."""
        col = self._col_t
        mask = None if self._triton is not None else self._mask(b)
        hidden = self._embed(self._ids[:b].view(b, 1))
        cos, sin = self._rotary(hidden, self._pos[:b].view(b, 1))
        groups = self._n_heads // self._n_kv
        for i, layer in enumerate(self._layers):
            attn, fused = layer.self_attn, self._fused[i]
            x = layer.input_layernorm(hidden)
            qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
            q, k, v = torch.split(qkv, list(fused.qkv_sizes), dim=-1)
            q = q.view(b, 1, self._n_heads, self._head_dim).transpose(1, 2)
            k = k.view(b, 1, self._n_kv, self._head_dim).transpose(1, 2)
            v = v.view(b, 1, self._n_kv, self._head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            write_kv(self._k[i], self._v[i], k, v, col)
            keys, values = self._k[i][:b], self._v[i][:b]
            # NOTE: grouped-query attention as a query of length `groups` per KV head: same
            # result as repeating K/V, without copying them, and the fused kernels accept it.
            q = q.reshape(b, self._n_kv, groups, self._head_dim)
            if self._triton is not None:
                o = self._triton.decode_attention(
                    q,
                    keys,
                    values,
                    start=self._start[:b],
                    col=col,
                    scale=self._scale,
                    num_splits=self._num_splits,
                )
            else:
                o = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=self._scale
                )
            hidden = hidden + attn.o_proj(o.reshape(b, 1, self._n_heads * self._head_dim))
            gate, up = F.linear(layer.post_attention_layernorm(hidden), fused.gate_up).chunk(2, -1)
            hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        logits: torch.Tensor = self._lm_head(self._norm(hidden)[:, -1]).float()
        self._pos[:b].add_(1)
        col.add_(1)
        return logits

    def _mask(self, b: int) -> torch.Tensor:
        """Rows [0, b)'s columns outside [start, col] as one additive mask for every layer (a
        bool mask would be converted again in each)."""
        outside = (self._columns < self._start[:b, None]) | (self._columns > self._col_t)
        dtype = self.model.dtype
        return (outside.to(dtype) * torch.finfo(dtype).min).view(b, 1, 1, self.max_len)

    def _capture_graphs(self) -> None:
        """Capture the decode step at every bucket size, before any sequence holds a row."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            for b in reversed(self._buckets):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: compiled, kernels chosen, workspaces made
                        self._decode_fn(b)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._decode_fn(b)
                self._graphs[b] = (graph, logits)
            torch.cuda.synchronize()
            self._start.zero_()
            self._pos.zero_()
            self._set_col(0)
        log.info("captured decode graphs for batch sizes %s", self._buckets)

    # -- prefill --------------------------------------------------------------------------
    def _prefill_some(self) -> dict[int, int]:
        """Run up to `prefill_chunk` prompt tokens this step: whole prompts that fit go through
        one padded forward together; a longer one goes on alone, a chunk at a time."""
        budget, out = self.prefill_chunk, {}
        group: list[_Prefill] = []
        for prefill in list(self._prefills):
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
                out.update(self._join([prefill], logits, [prefill.cache]))
        if group:
            out.update(self._prefill_group(group))
        return out

    def _join(
        self, prefills: list[_Prefill], logits: torch.Tensor, caches: list[DynamicCache]
    ) -> dict[int, int]:
        """Sample each prefilled sequence's first token and give it a row."""
        requests = [SamplingRequest(p.new.params, p.new.prompt_ids) for p in prefills]
        joining = SamplingBatch.create(requests, vocab_size=logits.shape[-1], device=self.device)
        tokens = joining.sample(logits)
        for prefill, cache, token in zip(prefills, caches, tokens, strict=True):
            self._prefills.remove(prefill)
            prefill.cache = cache
            self._add_row(prefill, token)
        self._sampling = joining if self._sampling is None else self._sampling.concat(joining)
        return {p.new.rid: t for p, t in zip(prefills, tokens.tolist(), strict=True)}

    def _prefill_group(self, group: list[_Prefill]) -> dict[int, int]:
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
        output = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        caches = [_row_cache(cache, row, n) for row, n in enumerate(lengths)]
        return self._join(group, output.logits[:, -1].float(), caches)

    def _forward_chunk(self, prefill: _Prefill, start: int, end: int) -> torch.Tensor:
        ids = torch.tensor([list(prefill.new.prompt_ids[start:end])], device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        output = self.model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=prefill.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = output.logits[:, -1].float()
        return logits


@torch.library.custom_op("chatqueue::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    col: torch.Tensor,
) -> None:
    """Rows [0, B)'s new key and value [B, KV, 1, D] into column `col` of the whole caches.

    NOTE: an op of its own that names the whole cache buffers it mutates. Written inline as
    `cache[:b].index_copy_(...)` on a slice, Inductor copied both whole buffers every step (1.8 of
    3.4 ms a step at batch 64 on an H200); through this op the write stays in place."""
    b = k.shape[0]
    k_cache[:b].index_copy_(2, col, k)
    v_cache[:b].index_copy_(2, col, v)


@write_kv.register_fake
def _(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    col: torch.Tensor,
) -> None:
    return None


def _triton_attention(choice: str, device: torch.device, head_dim: int) -> Any:
    """The Triton decode-attention module, or None where SDPA is to be used."""
    if choice not in ("auto", "triton", "sdpa"):
        raise ValueError(f"attention must be auto, triton or sdpa, not {choice!r}")
    usable = device.type == "cuda" and head_dim in (16, 32, 64, 128, 256)
    if choice == "sdpa" or (choice == "auto" and not usable):
        return None
    try:
        from chatqueue.engine.hf import triton_decode
    except ImportError as exc:
        if choice == "triton":
            raise ValueError(f"Triton decode attention is not available: {exc}") from exc
        return None
    if not usable:
        raise ValueError("Triton decode attention needs CUDA and a power-of-two head size")
    return triton_decode


def _row_cache(cache: DynamicCache, row: int, length: int) -> DynamicCache:
    """One row of a left-padded batch cache: its last `length` columns."""
    one = DynamicCache()
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, DynamicLayer) and layer.keys is not None
        assert layer.values is not None
        keys = layer.keys[row : row + 1, :, -length:]
        one.update(keys, layer.values[row : row + 1, :, -length:], i)
    return one


@dataclass(frozen=True, slots=True)
class _Fused:
    """A layer's q/k/v and gate/up weights as one matrix each; the modules keep views of them,
    so the model's own forward (prefill) and the decode step read the same memory."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor


def _fuse_projections(layer: Any) -> _Fused:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    sizes = [int(p.weight.shape[0]) for p in projections]
    qkv = _fuse_into(projections, "weight")
    bias = _fuse_into(projections, "bias") if attn.q_proj.bias is not None else None
    gate_up = _fuse_into((mlp.gate_proj, mlp.up_proj), "weight")
    return _Fused(qkv, bias, (sizes[0], sizes[1], sizes[2]), gate_up)


def _fuse_into(modules: Sequence[torch.nn.Module], name: str) -> torch.Tensor:
    with torch.no_grad():
        fused = torch.cat([getattr(m, name).detach() for m in modules])
        start = 0
        for m in modules:
            n = getattr(m, name).shape[0]
            setattr(m, name, torch.nn.Parameter(fused[start : start + n], requires_grad=False))
            start += n
    return fused
