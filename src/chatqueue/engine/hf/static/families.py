"""Which model families the static-cache runner decodes, and how each one's decoder differs from
Llama's: one table of switches, read once into a `ModelPlan` (what the decode step needs to know
about this model, layer by layer). Everything else about a family (its norms, activations, RoPE
tables, scaling) is the model's own modules and buffers, called as transformers calls them.

transformers' modeling files are the reference for every switch: `models/<type>/modeling_<type>.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedModel


class UnsupportedModel(ValueError):
    """The static-cache runner cannot run this model; the dynamic batched runner can."""


Norms = Literal["pre", "sandwich", "post"]


@dataclass(frozen=True, slots=True)
class Family:
    """How one model type's decoder layer differs from Llama's.

    `norms`: "pre" (Llama: input_layernorm before attention, post_attention_layernorm before the
    MLP); "sandwich" (Gemma 2/3: also a norm after each block, pre_feedforward_layernorm before the
    MLP); "post" (OLMo 2: no norm before a block, one after each). `qk_norm`: "head" (Qwen3, Gemma3:
    q_norm/k_norm over each head), "full" (OLMo 2: over the whole projection, before the heads are
    split). `windows`: which layers attend within `config.sliding_window`: "all" (Mistral, Phi-3),
    "by_layer_type" (those whose `config.layer_types` entry is "sliding_attention"). `rope_tables`:
    Gemma3's local and global RoPE, one table per layer type. `no_rope_layers`: SmolLM3's NoPE
    layers (`config.no_rope_layers[i] == 0`). `attn_softcap` (Gemma2), `final_softcap` (Gemma2/3):
    tanh soft-capping of attention scores and of the logits. `multipliers`: Granite's
    embedding, residual and attention multipliers and its logits divisor. `fused_qkv`: Phi-3's
    checkpoints hold q/k/v and gate/up as one matrix each already."""

    norms: Norms = "pre"
    qk_norm: Literal["head", "full"] | None = None
    windows: Literal["all", "by_layer_type"] | None = None
    rope_tables: bool = False
    no_rope_layers: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    multipliers: bool = False
    fused_qkv: bool = False


_GEMMA3 = Family(
    norms="sandwich", qk_norm="head", windows="by_layer_type", rope_tables=True, final_softcap=True
)

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(windows="all"),
    "qwen2": Family(windows="by_layer_type"),
    "qwen3": Family(qk_norm="head", windows="by_layer_type"),
    "gemma2": Family(
        norms="sandwich", windows="by_layer_type", attn_softcap=True, final_softcap=True
    ),
    "gemma3_text": _GEMMA3,
    # the multimodal checkpoint: its language model alone decodes here; its head, unlike
    # Gemma3ForCausalLM's, applies no final soft-capping (Gemma 3's configs set none anyway)
    "gemma3": dataclasses.replace(_GEMMA3, final_softcap=False),
    "phi3": Family(windows="all", fused_qkv=True),
    "smollm3": Family(windows="by_layer_type", no_rope_layers=True),
    "olmo2": Family(norms="post", qk_norm="full"),
    "granite": Family(multipliers=True),
}

SUPPORTED_MODEL_TYPES = frozenset(FAMILIES)

# Routed experts: one token's MLP is a few of many matrices, a different few per row; the
# static decode step runs one dense MLP for the whole batch.
_MIXTURE_OF_EXPERTS = frozenset(
    {"mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "olmoe", "phimoe", "deepseek_v3", "dbrx"}
)


@dataclass(frozen=True, slots=True)
class LayerPlan:
    window: int | None  # attends to its last `window` positions (the query's own included)
    rope: str | None  # the RoPE table it rotates q and k with; None: no position encoding


@dataclass(frozen=True, slots=True)
class Rope:
    """A RoPE table as the model's rotary module holds it: cos/sin = cos/sin(pos * inv_freq)
    repeated over both halves, times `scaling`."""

    inv_freq: torch.Tensor
    scaling: float


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What the decode step reads of one model, resolved once."""

    model_type: str
    family: Family
    text_model: Any  # the decoder stack: embed_tokens, layers, norm, rotary_emb
    lm_head: torch.nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerPlan, ...]
    ropes: dict[str, Rope]
    attn_softcap: float | None
    final_softcap: float | None
    embedding_multiplier: float
    residual_multiplier: float
    logits_divisor: float

    @property
    def windows(self) -> list[int | None]:
        """The distinct attention spans, full (None) first."""
        spans = {layer.window for layer in self.layers}
        return sorted(spans, key=lambda w: -1 if w is None else w)


def text_config(model: PreTrainedModel) -> Any:
    return model.config.get_text_config(decoder=True)


def check_supported(model: PreTrainedModel, max_len: int) -> None:
    plan_for(model, max_len)


def plan_for(model: PreTrainedModel, max_len: int) -> ModelPlan:
    """The plan of `model`'s decode, or UnsupportedModel saying why the static runner can't."""
    model_type = model.config.model_type
    family = _family(model_type)
    config = text_config(model)
    text_model = model.model.language_model if model_type == "gemma3" else model.model
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel(f"{model_type} with bidirectional attention is not a causal LM")
    attn = text_model.layers[0].self_attn
    multipliers = family.multipliers
    return ModelPlan(
        model_type=model_type,
        family=family,
        text_model=text_model,
        lm_head=model.lm_head,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=int(attn.head_dim),
        layers=_layer_plans(family, config, max_len),
        ropes=_ropes(family, config, text_model.rotary_emb, max_len),
        attn_softcap=config.attn_logit_softcapping if family.attn_softcap else None,
        final_softcap=config.final_logit_softcapping if family.final_softcap else None,
        embedding_multiplier=float(config.embedding_multiplier) if multipliers else 1.0,
        residual_multiplier=float(config.residual_multiplier) if multipliers else 1.0,
        logits_divisor=float(config.logits_scaling) if multipliers else 1.0,
    )


def _family(model_type: str) -> Family:
    if model_type in _MIXTURE_OF_EXPERTS:
        raise UnsupportedModel(
            f"model type {model_type!r} is a mixture of experts; the static runner decodes "
            "dense MLPs only"
        )
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not one the static runner knows "
            f"({', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def _layer_plans(family: Family, config: Any, max_len: int) -> tuple[LayerPlan, ...]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) if family.windows else None
    if window is not None and window >= max_len:
        window = None  # no sequence outgrows it: every layer attends to all it holds
    if family.windows == "by_layer_type":
        types = list(config.layer_types)
        windows = [window if t == "sliding_attention" else None for t in types]
    else:
        windows = [window] * n
    if family.rope_tables:
        ropes: list[str | None] = list(config.layer_types)
    elif family.no_rope_layers:
        ropes = ["default" if config.no_rope_layers[i] else None for i in range(n)]
    else:
        ropes = ["default"] * n
    return tuple(LayerPlan(windows[i], ropes[i]) for i in range(n))


def _ropes(family: Family, config: Any, rotary: Any, max_len: int) -> dict[str, Rope]:
    """The model's RoPE tables, refused where they change with the sequence's length: a batch's
    rows are of different lengths, and transformers picks one table for a whole forward."""
    names = sorted(set(config.layer_types)) if family.rope_tables else ["default"]
    ropes = {}
    for name in names:
        prefix = f"{name}_" if family.rope_tables else ""
        rope_type = rotary.rope_type[name] if family.rope_tables else rotary.rope_type
        if "dynamic" in rope_type:
            raise UnsupportedModel(f"RoPE type {rope_type!r} changes with the sequence's length")
        if rope_type == "longrope":
            original = _original_max_positions(config)
            if max_len > original:
                raise UnsupportedModel(
                    f"longrope switches tables past {original} positions; max_len {max_len} "
                    f"is longer (pass --max-model-len {original} or less)"
                )
        inv_freq = getattr(rotary, f"{prefix}inv_freq")
        scaling = float(getattr(rotary, f"{prefix}attention_scaling"))
        ropes[name] = Rope(inv_freq, scaling)
    return ropes


def _original_max_positions(config: Any) -> int:
    parameters = getattr(config, "rope_parameters", None) or {}
    original = parameters.get("original_max_position_embeddings")
    if original is None:
        original = getattr(config, "original_max_position_embeddings", None)
    return int(original or config.max_position_embeddings)
