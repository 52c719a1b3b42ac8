"""Loading a model from local files: a sharded safetensors folder, a GGUF file, --dtype, the
model's generation config (EOS ids, sampling defaults), --chat-template overriding the model's,
and what was chosen (runner, attention, cache, dtype, graphs) in the log and in /v1/models; a model
type the static runner cannot run falls back to the dynamic runner with a log line saying why."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from chatqueue.engine.hf import gguf_cache
from chatqueue.engine.hf.paged import HFPagedRunner
from chatqueue.engine.runner import NewSequence, StepBatch, runner_info
from chatqueue.types import ChatMessage, SamplingParams
from tests.integration.test_hf_runner import TEMPLATE, load_in_process, tiny_llama
from tests.support.servers import running_server
from tests.support.tiny_tokenizer import tiny_tokenizer

QWEN3 = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def save_with_tokenizer(model: torch.nn.Module, folder: Path, **save: object) -> Path:
    model.save_pretrained(folder, **save)  # type: ignore[operator]
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3 checkpoint in several safetensors shards, whose generation config samples."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3))
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20, eos_token_id=[2, 5]
    )
    folder = tmp_path_factory.mktemp("qwen3")
    return save_with_tokenizer(model, folder, max_shard_size="100KB")


def test_a_sharded_folder_loads_on_the_static_runner_in_the_dtype_asked(
    qwen3_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(list(qwen3_folder.glob("model-*.safetensors"))) > 1
    with caplog.at_level(logging.INFO, logger="chatqueue.engine.hf.loader"):
        runner = load_in_process(
            model=str(qwen3_folder), device="cpu", dtype="bfloat16", kv_cache="static"
        )
    info = runner_info(runner)
    assert info["runner"] == "static" and info["model_type"] == "qwen3"
    assert info["dtype"] == "bfloat16" and info["attention"] == "sdpa"
    assert info["cache"]["rows"] == 8 and info["cache"]["bytes"] > 0
    assert "runner static for qwen3: attention sdpa" in caplog.text
    tokenizer = runner.tokenizer
    assert tokenizer.eos_token_ids == frozenset({2, 5})
    defaults = tokenizer.sampling_defaults  # type: ignore[attr-defined]
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.95, 20)
    new = NewSequence(0, tokenizer.apply_chat_template([ChatMessage("user", "hello")]), GREEDY)
    assert list(runner.step(StepBatch(new=[new], running=[], released=[])).tokens) == [0]
    runner.close()


GREEDY = SamplingParams(temperature=0.0)


def test_a_model_loads_without_hub_kernels(qwen3_folder: Path) -> None:
    """transformers 5.2x swaps layers for kernels it fetches from the Hub unless told not to;
    offline that failed every load on a GPU (benchmarks/RESULTS.md, issue 12)."""
    from chatqueue.engine.hf.loader import load_model

    model = load_model(qwen3_folder, device=torch.device("cpu"), dtype=torch.float32)

    assert model.use_kernels is False
    read = gguf_cache.read_gguf_model(gguf_cache.default_gguf_path())
    assert read.use_kernels is False


def test_chat_template_flag_overrides_the_models(qwen3_folder: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}", encoding="utf-8")
    runner = load_in_process(
        model=str(qwen3_folder), device="cpu", dtype="float32", chat_template=template
    )
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "hello")])
    assert runner.tokenizer.decode(prompt) == "[hello]"
    runner.close()


def test_a_mixture_of_experts_falls_back_with_the_reason_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**QWEN3, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    folder = save_with_tokenizer(Qwen3MoeForCausalLM(config), tmp_path / "moe")
    with caplog.at_level(logging.INFO, logger="chatqueue.engine.hf.loader"):
        runner = load_in_process(model=str(folder), device="cpu", dtype="float32")
    # its attention is plain: the dynamic path's paged runner takes it
    assert runner_info(runner)["runner"] == "paged (continuous batching, prefix reuse)"
    assert "static KV cache off" in caplog.text and "mixture of experts" in caplog.text
    runner.close()


def test_a_gguf_file_is_converted_once_and_served_under_its_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The GGUF read itself is transformers' (30 s for SmolLM2, run by the model tests); here a
    stand-in returns a tiny model, to check the file's way through the cache."""
    reads: list[Path] = []

    def read_model(path: Path) -> torch.nn.Module:
        reads.append(path)
        return tiny_llama()

    def read_tokenizer(path: Path) -> PreTrainedTokenizerFast:
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = TEMPLATE
        return tokenizer

    monkeypatch.setattr(gguf_cache, "read_gguf_model", read_model)
    monkeypatch.setattr(gguf_cache, "read_gguf_tokenizer", read_tokenizer)
    gguf = tmp_path / "Tiny-Chat.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")  # only its path, size and time are read before the conversion
    cache = tmp_path / "cache"
    for _ in range(2):
        runner = load_in_process(model=str(gguf), device="cpu", dtype="float32", cache=cache)
        assert runner.model_name == "Tiny-Chat.Q8_0"
        runner.close()
    assert reads == [gguf]  # converted the first time only
    (folder,) = (cache / "models").iterdir()
    assert folder.name.startswith("Tiny-Chat.Q8_0-")
    with pytest.raises(gguf_cache.ModelNotFound, match="not a file"):
        load_in_process(model=str(tmp_path / "missing.gguf"), cache=cache)


def test_the_server_reports_what_serves_in_its_log_and_v1_models(
    qwen3_folder: Path, tmp_path: Path
) -> None:
    """Through the model process: its choices cross with its Ready message."""
    args = ("--model", str(qwen3_folder), "--device", "cpu", "--kv-cache", "static")
    with running_server(*args, "--max-concurrent", "2", tmp_path=tmp_path) as server:
        (entry,) = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=60,
        )
    engine = entry["engine"]
    assert engine["runner"] == "static" and engine["model_type"] == "qwen3"
    assert engine["cache"]["rows"] == 2 and engine["dtype"] == "float32"
    assert engine["attention"] == "sdpa" and engine["cuda_graph_batch_sizes"] == []
    assert reply.status_code == 200, reply.text
    assert "runner static for qwen3: attention sdpa" in server.log()


def test_the_paged_cache_asked_for_serves_with_its_decode_step_apart(
    qwen3_folder: Path, tmp_path: Path
) -> None:
    """`--kv-cache paged`: the pool, prefix reuse and the family's decode step apart from
    prefill (on a GPU compiled and graphed; here eager), through the model process."""
    args = ("--model", str(qwen3_folder), "--device", "cpu", "--dtype", "float32")
    paged = ("--kv-cache", "paged", "--kv-block-size", "4", "--max-concurrent", "2")
    first = [{"role": "user", "content": "tell me about the weather in the hills today"}]
    with running_server(*args, *paged, tmp_path=tmp_path) as server:
        (entry,) = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]

        def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
            body = {"messages": messages, "max_tokens": 4, "temperature": 0}
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answer: dict[str, Any] = reply.json()
            return answer

        one = ask(first)
        said = one["choices"][0]["message"]["content"]
        two = ask(
            [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "and?"}]
        )
    assert (
        entry["engine"]["runner"]
        == "paged (continuous batching, prefix reuse, a decode step apart)"
    )
    assert entry["engine"]["attention"].startswith("decode gather + sdpa")
    assert (
        two["usage"]["prompt_tokens_details"]["cached_tokens"] >= one["usage"]["prompt_tokens"] - 4
    )


def test_the_paged_cache_takes_sliding_windows_with_its_decode_step_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A windowed model asked onto the pool is served with its decode step apart (and its prompt
    steps through that step), as a full-attention one is: its kernels apply the window."""
    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    folder = save_with_tokenizer(Qwen3ForCausalLM(config), tmp_path / "windowed")
    with caplog.at_level(logging.INFO):
        runner = load_in_process(model=str(folder), device="cpu", dtype="float32", kv_cache="paged")
    assert isinstance(runner.model, HFPagedRunner)
    assert runner.model._decode is not None and runner.model._packed is not None
    assert runner.kv_spec is not None  # admission by blocks, prefix reuse
    assert "decode packed with prefill" not in caplog.text


def test_the_runners_pass_the_cache_without_a_deprecation_warning() -> None:
    """transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns, and
    goes in 5.40): prefill and decode of both runners pass it under the forward's own name."""
    from chatqueue.engine.hf.runner import HFBatchedRunner
    from chatqueue.engine.hf.static import StaticCacheRunner

    model = tiny_llama()
    runners = [
        HFBatchedRunner(model),
        StaticCacheRunner(model=model, max_batch=2, max_len=32, use_cuda_graphs=False),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for runner in runners:
            new = [NewSequence(0, [5, 6, 7], GREEDY)]
            runner.step(StepBatch(new=new, running=[], released=[]))
            runner.step(StepBatch(new=[], running=[0], released=[]))
    assert [str(w.message) for w in caught if "deprecated" in str(w.message)] == []


def test_which_cache_serves_by_kv_cache_device_and_model() -> None:
    """The loader's choice (`_runner_kind`, no GPU needed: it reads the device's type only)."""
    from chatqueue.engine.hf.loader import _runner_kind

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    llama = tiny_llama()
    windowed = Qwen3ForCausalLM(
        Qwen3Config(**QWEN3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    )
    moe = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**QWEN3, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    )

    def kind(kv_cache: str, model: Any, device: torch.device, *, triton: bool = True) -> str:
        return _runner_kind(kv_cache, model, device, 64, triton_runs=triton)

    assert kind("auto", llama, cuda) == "paged"
    assert kind("auto", llama, cuda, triton=False) == "static"  # prompt steps would be eager
    assert kind("auto", windowed, cuda) == "static"  # its windowed layers keep their window
    assert kind("auto", llama, cpu) == "paged-packed"
    assert kind("auto", windowed, cpu) == "paged-packed"  # the pool, decode in the forward
    assert kind("auto", moe, cuda) == "paged-packed"  # no decode step: dynamic
    assert kind("paged", llama, cuda) == "paged"
    assert kind("paged", llama, cpu) == "paged"
    assert kind("paged", moe, cpu) == "paged-packed"
    assert kind("dynamic", llama, cuda) == "paged-packed"
    assert kind("static", llama, cpu) == "static"
    assert kind("paged", windowed, cuda) == "paged"
