"""The decode step of Llama-family models (Llama, Mistral, Qwen2) over the static cache: the
model's own modules and weights, with q/k/v and gate/up each run as one fused projection."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from chatqueue.engine.hf.static.attention import SlotAttention
from chatqueue.engine.hf.static.regions import Region
from chatqueue.engine.hf.static.slots import KvShape, KvSlots

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


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


def kv_shape(model: PreTrainedModel) -> KvShape:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KvShape(len(model.model.layers), config.num_key_value_heads, head_dim)


class LlamaDecode:
    def __init__(
        self,
        model: PreTrainedModel,
        slots: KvSlots,
        *,
        attention: str,
        compile: bool,
        compile_cache: Path | None = None,
    ) -> None:
        """Fuses the model's projections in place (its own forward, used for prefill, reads
        them too); `attention` is SlotAttention's choice. `compile`: the decoder layer through
        Inductor (regional compilation, see `_layer_step`), the compiled regions kept in
        `compile_cache` (regions.py)."""
        config = model.config
        self._n_heads = config.num_attention_heads
        self._n_kv = config.num_key_value_heads
        self._head_dim = slots.shape.head_dim
        inner = model.model
        self._embed, self._layers, self._norm = inner.embed_tokens, inner.layers, inner.norm
        self._rotary, self._lm_head = inner.rotary_emb, model.lm_head
        self._scale = float(self._layers[0].self_attn.scaling)
        self._fused = [_fuse_projections(layer) for layer in self._layers]
        self._slots = slots
        self._attention = SlotAttention(
            slots, choice=attention, num_heads=self._n_heads, scale=self._scale
        )
        self._qkv_sizes = list(self._fused[0].qkv_sizes)
        # NOTE: regional compilation. The layers share one code path and differ only in their
        # tensors, all passed as arguments, so Dynamo traces one layer once and every layer
        # runs the same compiled graph; the step's start (embedding, RoPE) and end (norm, head)
        # are regions of their own. Compiling the whole step traced every layer: 37-47 s of
        # each restart on an H200 even with warm caches.
        self._begin_step: Any = self._begin
        self._layer_step: Any = self._layer
        self._end_step: Any = self._end
        if compile:
            key = f"{config.to_json_string()}{model.dtype}"
            region = functools.partial(Region, folder=compile_cache, model_key=key)
            self._begin_step = region(self._begin, dynamic=("ids", "pos"))
            dynamic = ("hidden", "delta", "cos", "sin", "mask")
            self._layer_step = region(self._layer, dynamic=dynamic)
            self._end_step = region(self._end, dynamic=("hidden", "delta"))

    def forward(self, b: int) -> torch.Tensor:
        """One token for rows [0, b): only static buffers, no host synchronisation (capturable)."""
        slots = self._slots
        mask = self._attention.mask(b)
        hidden, cos, sin = self._begin_step(slots.ids[:b], slots.pos[:b])
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self._layers):
            fused = self._fused[i]
            hidden, delta = self._layer_step(
                layer,
                hidden,
                delta,
                cos,
                sin,
                mask,
                fused.qkv_weight,
                fused.qkv_bias,
                fused.gate_up,
                slots.k[i],
                slots.v[i],
            )
        logits: torch.Tensor = self._end_step(hidden, delta)
        slots.pos[:b].add_(1)
        slots.col_t.add_(1)
        return logits

    def _begin(
        self, ids: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = ids.shape[0]
        hidden = self._embed(ids.view(b, 1))
        cos, sin = self._rotary(hidden, pos.view(b, 1))
        return hidden, cos, sin

    def _layer(
        self,
        layer: Any,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        gate_up: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer for rows [0, b): every tensor it reads is an argument, so one
        compiled graph serves every layer (and one more the first, which has no `delta`).
        `delta` is the previous layer's MLP output, added here to the residual stream so that
        the add fuses with this layer's norm (as it would within one compiled graph)."""
        b = hidden.shape[0]
        if delta is not None:
            hidden = hidden + delta
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        qkv = F.linear(x, qkv_weight, qkv_bias)
        q, k, v = torch.split(qkv, self._qkv_sizes, dim=-1)
        q = q.view(b, 1, self._n_heads, self._head_dim).transpose(1, 2)
        k = k.view(b, 1, self._n_kv, self._head_dim).transpose(1, 2)
        v = v.view(b, 1, self._n_kv, self._head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = self._attention.attend_into(k_cache, v_cache, q=q, k=k, v=v, mask=mask)
        hidden = hidden + attn.o_proj(o.reshape(b, 1, self._n_heads * self._head_dim))
        gate, up = F.linear(layer.post_attention_layernorm(hidden), gate_up).chunk(2, -1)
        out: torch.Tensor = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return hidden, out

    def _end(self, hidden: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        if delta is not None:
            hidden = hidden + delta
        logits: torch.Tensor = self._lm_head(self._norm(hidden)[:, -1]).float()
        return logits


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
