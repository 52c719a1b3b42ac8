"""Every family the static-cache runner supports, on a tiny random model built here
(`tests/support/tiny_families.py`): greedy tokens equal to `generate()` token for token, and
logprobs equal to its logits, while requests join at different steps, one prompt is longer than the
sliding window (where the family has one, whose layers keep a ring of its columns), and the cache
wraps. The CPU path of the runner (SDPA, or eager attention where scores are soft-capped; no
graphs); a few families also through the compiled step."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.static import SUPPORTED_MODEL_TYPES, StaticCacheRunner
from tests.support.tiny_families import (
    FAMILIES,
    WINDOW,
    mismatches,
    tiny,
    tiny_gemma3_multimodal,
)


def make_runner(
    model: PreTrainedModel, *, compile: bool = False, compile_cache: Path | None = None
) -> StaticCacheRunner:
    # 40 columns: the longest request (30 + 10 tokens) fills them, so the write column wraps
    return StaticCacheRunner(
        model=model,
        max_batch=5,
        max_len=40,
        prefill_chunk=16,
        use_cuda_graphs=False,
        compile=compile,
        compile_cache=compile_cache,
    )


def test_every_supported_type_has_a_tiny_model_here() -> None:
    assert set(FAMILIES) | {"gemma3"} == SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_generate(family: str) -> None:
    runner, found = mismatches(tiny(family), make_runner)
    assert found == []
    assert runner.num_compactions > 0  # the write column wrapped at least once
    windows = {layer.window for layer in runner.decode.plan.layers}
    if family in ("mistral", "phi3"):
        assert windows == {WINDOW}  # every layer slides
    else:
        assert windows == ({None, WINDOW} if FAMILIES[family].window else {None})
    # a sliding-window layer's rows hold a ring of its window's columns, the others max_len
    held = [k.shape[2] for k in runner.slots.k]
    assert held == [40 if layer.window is None else WINDOW for layer in runner.decode.plan.layers]


def test_gemma3_multimodal_decodes_its_language_model() -> None:
    """A `gemma3` checkpoint (Gemma3ForConditionalGeneration, vision tower and all) serves text:
    its language model decodes on the static runner, equal to its own generate()."""
    runner, found = mismatches(tiny_gemma3_multimodal(), make_runner)
    assert found == []
    assert runner.decode.plan.final_softcap is None  # its head applies none, unlike the text one


LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.timeout(900)  # a safety net: Inductor's C++ compile takes minutes of CPU here
def test_the_compiled_step_equals_generate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The step the GPU runs, its regions compiled ahead of time as the server compiles them
    (for the CPU here), on the family with the most switches on: Gemma3's sandwich norms,
    per-head q/k norms, two RoPE tables, alternating windows and final soft-capping survive
    compilation, and no region falls back to JIT. (One family only: each compile costs over a
    minute of the suite's 2 cores; benchmarks/bench_families.py compiles every family on the
    GPU.)"""
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="chatqueue.engine.hf.static.regions"):
        model = tiny("gemma3_text", num_hidden_layers=3, layer_types=LAYER_TYPES)
        _, found = mismatches(model, lambda m: make_runner(m, compile=True, compile_cache=tmp_path))
    assert found == []
    assert "failed; JIT instead" not in caplog.text
    assert "guards refused" not in caplog.text
    # the start; the first layer (no delta); a full and a sliding layer with delta (their KV
    # buffers of other sizes: the sliding one's a ring of its window); the end
    assert len(list(tmp_path.glob("*.bin"))) == 5
