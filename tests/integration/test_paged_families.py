"""Every family the static runner supports, on the paged pool, with its decode rows packed into
the model's forward (the CPU's way) or its decode step apart and prompt steps through that step
(the GPU's way, eager here; and in tiles, as the GPU's packed kernel takes them): sliding-window
layers (Mistral, Qwen2 past its window layers,
Phi-3, SmolLM3, every Gemma 2/3 local layer) and Gemma 2's soft-capped scores included. Each
scenario of `tests/support/paged_drive.scenarios` (requests joining and leaving with a prompt past
the window, prefix reuse, prompts in chunks beside decode, preemption) must give `generate()`'s
greedy tokens exactly, on a tiny random fp32 model built here."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch

from chatqueue.config import Settings
from chatqueue.engine.hf.loader import _runner_kind
from chatqueue.engine.hf.paged import HFPagedRunner, check_paged_supported
from chatqueue.engine.hf.paged.decode import DecodeOptions
from tests.support.paged_drive import MODES, make_paged, prompts_of, scenarios
from tests.support.tiny_families import FAMILIES, WINDOW, reference, tiny


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_on_the_pool_equals_generate(family: str, mode: str) -> None:
    model = tiny(family)

    def make(**kw: Any) -> HFPagedRunner:
        return make_paged(model, mode, **kw)

    assert scenarios(model, make) == {
        "join_and_leave": True,
        "prefix_reuse": True,
        "chunks_beside_decode": True,
        "preemption": True,
    }


def test_the_window_changes_what_the_scenarios_generate() -> None:
    """The scenarios would catch a window not applied: the same weights without the window give
    other tokens for their longest prompt (30 tokens, the window is WINDOW)."""
    windowed = tiny("mistral")
    config = copy.deepcopy(windowed.config)
    config.sliding_window = None
    unwindowed = type(windowed)(config).eval()
    unwindowed.load_state_dict(windowed.state_dict())
    prompt = prompts_of([30])[0]
    assert len(prompt) > WINDOW
    assert reference(windowed, prompt, 12).tokens != reference(unwindowed, prompt, 12).tokens


def test_a_windowed_or_soft_capped_model_takes_the_decode_step_apart() -> None:
    """The decode step apart (the GPU's way) and its kernels apply windows and soft-capping:
    `--kv-cache paged` serves Gemma 2 and Mistral with it, as it does Llama."""
    for family in ("gemma2", "mistral"):
        model = tiny(family)
        check_paged_supported(model)
        kind = _runner_kind("paged", model, torch.device("cpu"), 64, triton_runs=False)
        assert kind == "paged"
        runner = HFPagedRunner(
            model,
            num_blocks=16,
            decode=DecodeOptions(max_batch=2, compile=False, cuda_graphs=False),
            context_window=64,
        )
        assert runner._decode is not None and runner._packed is not None


def test_on_a_cpu_auto_serves_windowed_families_from_the_pool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A windowed family on a CPU is served from the pool with its decode rows packed into the
    forward (prefix reuse and admission by blocks); on CUDA `auto` keeps the static cache for
    it (whose windowed layers keep only their window), and the log says why."""
    assert Settings().kv_cache == "auto"
    model = tiny("gemma3_text")
    with caplog.at_level(logging.INFO):
        assert _runner_kind("auto", model, torch.device("cpu"), 64, triton_runs=False) == (
            "paged-packed"
        )
        assert _runner_kind("auto", model, torch.device("cuda"), 64, triton_runs=True) == "static"
    assert "paged KV cache off on CUDA (sliding windows or soft-capped scores" in caplog.text
