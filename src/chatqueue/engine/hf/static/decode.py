"""The decode step for every family in `families.py`: the model's own modules and weights (norms,
activations, projections), with q/k/v and gate/up each run as one fused projection, and the
family's switches (its `ModelPlan`) deciding what runs around them. Where the KV lives is the
caller's: the static cache's rows (`slots.py`, `attention.py`) or the paged pool's blocks
(`paged/decode.py`), behind `StepInputs` and `StepAttention`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from chatqueue.engine.hf.static.attention import Span
from chatqueue.engine.hf.static.families import ModelPlan, Rope, plan_for
from chatqueue.engine.hf.static.regions import Region
from chatqueue.engine.hf.static.slots import KvShape

CosSin = tuple[torch.Tensor, torch.Tensor]


class StepInputs(Protocol):
    """The decode step's input buffers: each row's next token and its position, and each layer's
    KV buffers. Written in place, never replaced, so that captured CUDA graphs keep reading them."""

    ids: torch.Tensor
    pos: torch.Tensor
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    def advance(self, b: int) -> None:
        """After a step of rows [0, b), on the device (capturable)."""


class StepAttention(Protocol):
    """Decode attention over where the KV lives: which positions each row reads (`spans`, once a
    step), then a layer's new KV written and attended over (`attend_into`)."""

    @property
    def kernel(self) -> str: ...

    def spans(self, b: int, windows: Sequence[int | None]) -> dict[int | None, Span]: ...

    def attend_into(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: Span,
    ) -> torch.Tensor: ...


def kv_shape(model: PreTrainedModel, max_len: int) -> KvShape:
    plan = plan_for(model, max_len)
    return KvShape(len(plan.layers), plan.num_kv_heads, plan.head_dim)


def attention_scale(model: PreTrainedModel, max_len: int) -> float:
    """The scale of the model's attention scores (its first layer's, as all share it)."""
    return float(plan_for(model, max_len).text_model.layers[0].self_attn.scaling)


class DecodeStep:
    def __init__(
        self,
        model: PreTrainedModel,
        inputs: StepInputs,
        attention: StepAttention,
        *,
        max_len: int,
        compile: bool,
        compile_cache: Path | None = None,
        fused_by: DecodeStep | None = None,
    ) -> None:
        """Fuses the model's projections in place (its own forward, used for prefill, reads
        them too), or reads those `fused_by` fused (another step over the same model).
        `max_len`: the longest sequence a row holds. `compile`: the decoder layer through
        Inductor (regional compilation, see `_layer_step`), the compiled regions kept in
        `compile_cache` (regions.py)."""
        self.plan = plan = plan_for(model, max_len)
        inner = plan.text_model
        self._embed, self._layers, self._norm = inner.embed_tokens, inner.layers, inner.norm
        self._lm_head = plan.lm_head
        self._fused: list[_Fused] = (
            fused_by._fused
            if fused_by is not None
            else [_fuse_projections(layer, plan) for layer in self._layers]
        )
        self._qkv_sizes = list(self._fused[0].qkv_sizes)
        self._inputs = inputs
        self._attention = attention
        self._windows = plan.windows
        # where the KV lives and how it is read: part of each compiled region's key (regions.py
        # keys a region by its owner's plain attributes), as the attention is traced into it
        self.attention_kind = type(attention).__qualname__
        # NOTE: regional compilation. The layers share one code path and differ only in their
        # tensors, all passed as arguments, so Dynamo traces one layer once and every layer
        # runs the same compiled graph (one more where a layer has no RoPE); the step's start
        # (embedding, RoPE) and end (norm, head) are regions of their own. Compiling the whole
        # step traced every layer: 37-47 s of each restart on an H200 even with warm caches.
        self.compiled = compile
        self.compile_cache = compile_cache
        self._begin_step: Any = self._begin
        self._layer_step: Any = self._layer
        self._end_step: Any = self._end
        if compile:
            key = f"{model.config.to_json_string()}{model.dtype}"
            region = functools.partial(Region, folder=compile_cache, model_key=key)
            self._begin_step = region(self._begin, dynamic=("ids", "pos"))
            dynamic = ("hidden", "delta", "cos", "sin", "mask", "start", "table", "end", "slot")
            self._layer_step = region(self._layer, dynamic=dynamic)
            self._end_step = region(self._end, dynamic=("hidden", "delta", "keep"))

    @property
    def attention_kernel(self) -> str:
        return self._attention.kernel

    def forward(self, b: int) -> torch.Tensor:
        """One token for rows [0, b): only static buffers, no host synchronisation (capturable).
        Returns the logits of every row."""
        hidden, delta = self.layers(b)
        logits = self.logits(hidden, delta)
        self._inputs.advance(b)
        return logits

    def logits(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last layer's output -> the logits [rows, vocab] of every row or of `keep`'s."""
        logits: torch.Tensor = self._end_step(hidden, delta, keep)
        return logits

    def layers(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows [0, b) through every layer (capturable): the residual stream and what the last
        layer adds to it (`logits` adds them)."""
        inputs = self._inputs
        spans = self._attention.spans(b, self._windows)
        hidden, ropes = self._begin_step(inputs.ids[:b], inputs.pos[:b])
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self._layers):
            planned, fused = self.plan.layers[i], self._fused[i]
            cos, sin = ropes[planned.rope] if planned.rope is not None else (None, None)
            span = spans[planned.window]
            hidden, delta = self._layer_step(
                layer,
                hidden,
                delta,
                cos,
                sin,
                span.mask,
                span.start,
                span.table,
                span.end,
                span.slot,
                span.window,
                fused.qkv_weight,
                fused.qkv_bias,
                fused.gate_up,
                fused.gate_up_bias,
                inputs.k[i],
                inputs.v[i],
            )
        return hidden, delta

    def _begin(
        self, ids: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, CosSin]]:
        b = ids.shape[0]
        hidden = self._embed(ids.view(b, 1))  # Gemma's embedding scales itself
        if self.plan.embedding_multiplier != 1.0:
            hidden = hidden * self.plan.embedding_multiplier
        position = pos.view(b, 1)
        ropes = {
            name: _cos_sin(rope, position, hidden.dtype) for name, rope in self.plan.ropes.items()
        }
        return hidden, ropes

    def _layer(
        self,
        layer: Any,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | None,
        start: torch.Tensor | None,
        table: torch.Tensor | None,
        end: torch.Tensor | None,
        slot: torch.Tensor | None,
        window: int | None,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        gate_up: torch.Tensor,
        gate_up_bias: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer for rows [0, b): every tensor it reads is an argument, so one
        compiled graph serves every layer (and one more the first, which has no `delta`, and
        for a layer without RoPE). `mask` ... `window`: the layer's `Span`.
        `delta` is what the previous layer's MLP adds to the residual stream, added here so
        that the add fuses with this layer's norm (as it would within one compiled graph)."""
        if delta is not None:
            hidden = hidden + delta
        span = Span(mask, start, table, end, slot, window)
        out = self._attention_block(
            layer, hidden, cos, sin, span, qkv_weight, qkv_bias, k_cache, v_cache
        )
        hidden = hidden + self._residual(out)
        return hidden, self._residual(self._mlp_block(layer, hidden, gate_up, gate_up_bias))

    def _attention_block(
        self,
        layer: Any,
        hidden: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        span: Span,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        family, plan, b = self.plan.family, self.plan, hidden.shape[0]
        attn = layer.self_attn
        x = hidden if family.norms == "post" else layer.input_layernorm(hidden)
        q, k, v = torch.split(F.linear(x, qkv_weight, qkv_bias), self._qkv_sizes, dim=-1)
        if family.qk_norm == "full":  # OLMo 2: over all heads at once
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q.view(b, 1, plan.num_heads, plan.head_dim)
        k = k.view(b, 1, plan.num_kv_heads, plan.head_dim)
        v = v.view(b, 1, plan.num_kv_heads, plan.head_dim)
        if family.qk_norm == "head":  # Qwen3, Gemma3: each head alone
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cos is not None and sin is not None:
            q, k = _rotate(q, k, cos, sin)
        o = self._attention.attend_into(k_cache, v_cache, q=q, k=k, v=v, span=span)
        out: torch.Tensor = attn.o_proj(o.reshape(b, 1, plan.num_heads * plan.head_dim))
        if family.norms != "pre":
            out = layer.post_attention_layernorm(out)
        return out

    def _mlp_block(
        self,
        layer: Any,
        hidden: torch.Tensor,
        gate_up: torch.Tensor,
        gate_up_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        norms = self.plan.family.norms
        if norms == "pre":
            x = layer.post_attention_layernorm(hidden)
        elif norms == "sandwich":
            x = layer.pre_feedforward_layernorm(hidden)
        else:
            x = hidden
        gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, -1)
        out: torch.Tensor = layer.mlp.down_proj(_activation(layer.mlp)(gate) * up)
        if norms != "pre":
            out = layer.post_feedforward_layernorm(out)
        return out

    def _residual(self, out: torch.Tensor) -> torch.Tensor:
        """What a block adds to the residual stream (Granite scales it)."""
        multiplier = self.plan.residual_multiplier
        return out if multiplier == 1.0 else out * multiplier

    def _end(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, keep: torch.Tensor | None
    ) -> torch.Tensor:
        if delta is not None:
            hidden = hidden + delta
        if keep is not None:  # the rows whose logits are wanted: the norm and head for no other
            hidden = hidden.index_select(0, keep)
        logits: torch.Tensor = self._lm_head(self._norm(hidden)[:, -1])
        plan = self.plan
        if plan.logits_divisor != 1.0:  # Granite
            logits = logits / plan.logits_divisor
        if plan.final_softcap is not None:  # Gemma 2/3
            logits = torch.tanh(logits / plan.final_softcap) * plan.final_softcap
        return logits.float()


def _cos_sin(rope: Rope, position: torch.Tensor, dtype: torch.dtype) -> CosSin:
    """As the model's rotary module computes them (it is not called: where its table depends on
    the sequence's length it updates itself with a host sync, which a graph cannot hold)."""
    freqs = position[..., None].float() * rope.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rope.scaling).to(dtype), (emb.sin() * rope.scaling).to(dtype)


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb`, Phi-3's partial form included: the first
    `cos.shape[-1]` channels of each head rotate, the others pass through.

    NOTE: not the family's own function: transformers wraps it in a class defined inside a
    function (kernels from the hub), which a region compiled ahead of time cannot save."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    dim = cos.shape[-1]
    if dim == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :dim], q[..., dim:]
    k_rot, k_pass = k[..., :dim], k[..., dim:]
    q_rot = q_rot * cos + _rotate_half(q_rot) * sin
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _activation(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn")  # noqa: B009 (Phi-3's name)
    return cast(Callable[[torch.Tensor], torch.Tensor], act)


@dataclass(frozen=True, slots=True)
class _Fused:
    """A layer's q/k/v and gate/up weights as one matrix each; the modules keep views of them,
    so the model's own forward (prefill) and the decode step read the same memory."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None


def _fuse_projections(layer: Any, plan: ModelPlan) -> _Fused:
    attn, mlp = layer.self_attn, layer.mlp
    q_size = plan.num_heads * plan.head_dim
    kv_size = plan.num_kv_heads * plan.head_dim
    if plan.family.fused_qkv:  # Phi-3's checkpoints come fused
        qkv, gate_up = attn.qkv_proj, mlp.gate_up_proj
        return _Fused(
            qkv.weight, qkv.bias, (q_size, kv_size, kv_size), gate_up.weight, gate_up.bias
        )
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    gate_and_up = (mlp.gate_proj, mlp.up_proj)
    return _Fused(
        _fuse_into(projections, "weight"),
        _fuse_into(projections, "bias") if attn.q_proj.bias is not None else None,
        (q_size, kv_size, kv_size),
        _fuse_into(gate_and_up, "weight"),
        _fuse_into(gate_and_up, "bias") if mlp.gate_proj.bias is not None else None,
    )


def _fuse_into(modules: Sequence[torch.nn.Module], name: str) -> torch.Tensor:
    with torch.no_grad():
        fused = torch.cat([getattr(m, name).detach() for m in modules])
        start = 0
        for m in modules:
            n = getattr(m, name).shape[0]
            setattr(m, name, torch.nn.Parameter(fused[start : start + n], requires_grad=False))
            start += n
    return fused
