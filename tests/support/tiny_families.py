"""Tiny random models of every family the static runner supports (2 layers, hidden 64, no
downloads), and the check that a runner's greedy tokens and logprobs equal `generate()`'s for
requests that join at different steps. Shared by the tests (CPU) and benchmarks/bench_families.py
(GPU); no pytest here.

Weights are drawn wider than the configs' default (std 0.02), so that soft-capping, norms and
multipliers move the logits enough to change tokens when one of them is applied wrongly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import transformers
from transformers import PreTrainedModel

from chatqueue.engine.runner import ModelRunner, NewSequence, StepBatch
from chatqueue.types import SamplingParams

WINDOW = 8
COMMON: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "initializer_range": 0.1,
}


@dataclass(frozen=True)
class Tiny:
    """A family's tiny config: its classes' names in transformers and what differs from COMMON."""

    config: str
    model: str
    extra: dict[str, Any] = field(default_factory=dict)
    window: bool = False  # has sliding-window layers (of WINDOW positions)


FAMILIES: dict[str, Tiny] = {
    "llama": Tiny("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": Tiny("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}, True),
    "qwen2": Tiny(
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        True,
    ),
    "qwen3": Tiny(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {
            "head_dim": 32,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
        },
        True,
    ),
    "gemma2": Tiny(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 1.5,
            "final_logit_softcapping": 2.0,
            # transformers before 5.2x ran Gemma2 on SDPA, which drops the soft-capping; the
            # loader asks for eager attention too
            "attn_implementation": "eager",
        },
        True,
    ),
    "gemma3_text": Tiny(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 2.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
        True,
    ),
    "phi3": Tiny(
        "Phi3Config",
        "Phi3ForCausalLM",
        {"partial_rotary_factor": 0.5, "sliding_window": WINDOW},
        True,
    ),
    "smollm3": Tiny(
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": WINDOW},
        True,
    ),
    "olmo2": Tiny("Olmo2Config", "Olmo2ForCausalLM"),
    "granite": Tiny(
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.3,
            "logits_scaling": 0.25,
        },
    ),
}


def tiny(family: str, device: str = "cpu", **changes: Any) -> PreTrainedModel:
    """The family's tiny model; `changes` to its config (more layers, say)."""
    spec = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, spec.config)(**{**COMMON, **spec.extra, **changes})
    with torch.device(device):
        model: PreTrainedModel = getattr(transformers, spec.model)(config)
    return model.eval()


def tiny_gemma3_multimodal(device: str = "cpu") -> PreTrainedModel:
    """A `gemma3` checkpoint's model (Gemma3ForConditionalGeneration, a tiny vision tower too)."""
    text = {**COMMON, **FAMILIES["gemma3_text"].extra}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=300,
        boi_token_index=301,
        eoi_token_index=302,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.device(device):
        model: PreTrainedModel = transformers.Gemma3ForConditionalGeneration(config)
    return model.eval()


GREEDY = SamplingParams(temperature=0.0, logprobs=1)


@dataclass(frozen=True)
class Expected:
    tokens: list[int]
    logprobs: list[float]  # of each token, from generate()'s logits


def reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> Expected:
    """Greedy generation for one request alone (it may end early at EOS, and so must the runner)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = [int(t) for t in out.sequences[0, len(prompt) :]]
    logprobs = [
        float(torch.log_softmax(logits[0].float(), dim=-1)[token])
        for logits, token in zip(out.logits, tokens, strict=True)
    ]
    return Expected(tokens, logprobs)


def drive(
    runner: ModelRunner,
    prompts: list[list[int]],
    joins: dict[int, list[int]],
    budget: dict[int, int],
    *,
    cached: dict[int, int] | None = None,
) -> dict[int, Expected]:
    """Like the engine: sequences join at their step, each leaves when it has its tokens (a
    prompt may take several steps to its first). `cached` gets what the runner told of its own
    prefix reuse (`StepOutput.cached`); a runner that gives no logprobs leaves them NaN."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    logprobs: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    running: list[int] = []
    released: list[int] = []
    step = 0
    while step <= max(joins) or running:
        new = [NewSequence(i, prompts[i], GREEDY) for i in joins.get(step, [])]
        out = runner.step(StepBatch(new=new, running=list(running), released=released))
        if cached is not None:
            cached.update(out.cached)
        for rid, token in out.tokens.items():
            tokens[rid].append(token)
            logprob = out.logprobs.get(rid)
            logprobs[rid].append(math.nan if logprob is None else logprob.logprob)
        running += [n.rid for n in new]
        released = [i for i in running if len(tokens[i]) >= budget[i]]
        running = [i for i in running if i not in released]
        step += 1
        assert step < 200, "no progress"
    runner.step(StepBatch(new=[], running=[], released=released))
    return {i: Expected(tokens[i], logprobs[i]) for i in tokens}


# one prompt (30 tokens) longer than the window; 40 columns make the cache wrap while they run
LENGTHS = [5, 30, 3, 12, 9]
NEW_TOKENS = [12, 10, 14, 8, 12]
JOINS = {0: [0, 1], 2: [2], 3: [3], 6: [4]}


R = TypeVar("R", bound=ModelRunner)


def mismatches(
    model: PreTrainedModel, make: Callable[[PreTrainedModel], R], *, logprob_tol: float = 2e-4
) -> tuple[R, list[str]]:
    """Run LENGTHS' prompts joining at JOINS' steps through `make(model)`, and each alone
    through `generate()`; returns the runner and where they differ (nothing: equal)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in LENGTHS]
    expected = {i: reference(model, p, NEW_TOKENS[i]) for i, p in enumerate(prompts)}
    runner = make(model)
    got = drive(runner, prompts, JOINS, {i: len(e.tokens) for i, e in expected.items()})
    found = []
    for i, want in expected.items():
        if got[i].tokens != want.tokens:
            found.append(f"sequence {i}: tokens {got[i].tokens} != generate's {want.tokens}")
            continue
        worst = max(abs(a - b) for a, b in zip(got[i].logprobs, want.logprobs, strict=True))
        if not worst <= logprob_tol:  # NaN counts as a difference too
            found.append(f"sequence {i}: logprobs differ by up to {worst:.2e} (> {logprob_tol})")
    return runner, found
