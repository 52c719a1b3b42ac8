"""The decode step of Llama-family models (Llama, Mistral, Qwen2) over the static cache: the
model's own modules and weights, with q/k/v and gate/up each run as one fused projection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from chatqueue.engine.hf.static.attention import SlotAttention
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
    def __init__(self, model: PreTrainedModel, slots: KvSlots, *, attention: str) -> None:
        """Fuses the model's projections in place (its own forward, used for prefill, reads
        them too); `attention` is SlotAttention's choice."""
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

    def forward(self, b: int) -> torch.Tensor:
        """One token for rows [0, b): only static buffers, no host synchronisation (capturable)."""
        slots = self._slots
        col = slots.col_t
        mask = self._attention.mask(b)
        hidden = self._embed(slots.ids[:b].view(b, 1))
        cos, sin = self._rotary(hidden, slots.pos[:b].view(b, 1))
        for i, layer in enumerate(self._layers):
            attn, fused = layer.self_attn, self._fused[i]
            x = layer.input_layernorm(hidden)
            qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
            q, k, v = torch.split(qkv, list(fused.qkv_sizes), dim=-1)
            q = q.view(b, 1, self._n_heads, self._head_dim).transpose(1, 2)
            k = k.view(b, 1, self._n_kv, self._head_dim).transpose(1, 2)
            v = v.view(b, 1, self._n_kv, self._head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = self._attention.attend(i, q=q, k=k, v=v, mask=mask)
            hidden = hidden + attn.o_proj(o.reshape(b, 1, self._n_heads * self._head_dim))
            gate, up = F.linear(layer.post_attention_layernorm(hidden), fused.gate_up).chunk(2, -1)
            hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        logits: torch.Tensor = self._lm_head(self._norm(hidden)[:, -1]).float()
        slots.pos[:b].add_(1)
        col.add_(1)
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
