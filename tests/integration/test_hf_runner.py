"""The transformers runners against `model.generate`, on a tiny random Llama and on the real default model.

Steps are driven by hand, the way the engine loop drives them: sequences join at different steps,
leave when done, and every greedy output must equal what `generate(do_sample=False)` gives for that
request run alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
from transformers.utils.quantization_config import GgufConfig

from chatqueue.api.build import load_hf
from chatqueue.config import Settings
from chatqueue.engine.hf import gguf_cache
from chatqueue.engine.hf.paged import HFPagedRunner
from chatqueue.engine.hf.runner import HFBatchedRunner, HFSequentialRunner
from chatqueue.engine.loading import head_start
from chatqueue.engine.process import ProcessRunner
from chatqueue.engine.runner import ModelRunner, NewSequence, StepBatch, TokenizedRunner
from chatqueue.text.hf_tokenizer import HFTokenizer, MissingChatTemplate
from chatqueue.types import ChatMessage, SamplingParams
from tests.support.tiny_tokenizer import tiny_tokenizer

GREEDY = SamplingParams(temperature=0.0)
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
RunnerClass = type[HFBatchedRunner] | type[HFSequentialRunner]


def load_in_process(**settings: object) -> TokenizedRunner:
    """What `chatqueue serve --model-process off` loads (the tokenizer and the model here)."""
    runner = load_hf(Settings(engine="hf", model_process="off", **settings))  # type: ignore[arg-type]
    assert isinstance(runner, TokenizedRunner)
    return runner


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model folder without a chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy generation for one request alone; it ends early at EOS, and so must the runner."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, len(prompt) :]]


def drive(
    runner: ModelRunner,
    prompts: list[list[int]],
    *,
    joins: dict[int, list[int]],
    max_new_tokens: int | Callable[[int], int],
    params: Callable[[int], SamplingParams] = lambda _: GREEDY,
) -> dict[int, list[int]]:
    """Step `runner` by hand: seq i joins at the step `joins` names and leaves after its tokens."""
    budget = max_new_tokens if callable(max_new_tokens) else (lambda _: max_new_tokens)
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    running: list[int] = []
    released: list[int] = []
    step = 0
    while step <= max(joins) or running:
        new = [NewSequence(i, prompts[i], params(i)) for i in joins.get(step, [])]
        sampled = runner.step(StepBatch(new=new, running=list(running), released=released)).tokens
        assert set(sampled) == set(running) | {n.rid for n in new}
        for rid, token in sampled.items():
            outputs[rid].append(token)
        running += [n.rid for n in new]
        released = [i for i in running if len(outputs[i]) >= budget(i)]
        running = [i for i in running if i not in released]
        step += 1
    runner.step(StepBatch(new=[], running=[], released=released))
    return outputs


def make_runner(runner_class: RunnerClass, model: PreTrainedModel) -> ModelRunner:
    return runner_class(model)


@pytest.mark.parametrize("runner_class", [HFBatchedRunner, HFSequentialRunner])
def test_greedy_equals_generate_alone_while_sequences_join_and_leave(
    runner_class: RunnerClass, tiny_model: LlamaForCausalLM
) -> None:
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 17, 3, 30, 9, 1, 22, 12]
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in lengths]
    new_tokens = [12, 4, 9, 12, 2, 7, 12, 5]  # leave at different steps too
    expected = {i: reference(tiny_model, p, new_tokens[i]) for i, p in enumerate(prompts)}
    runner = make_runner(runner_class, tiny_model)

    got = drive(
        runner,
        prompts,
        joins={0: [0, 1, 2], 2: [3], 3: [4, 5], 7: [6], 9: [7]},
        max_new_tokens=lambda i: len(expected[i]),
    )

    assert got == expected


def test_greedy_equals_generate_alone_as_the_cache_outgrows_its_room(
    tiny_model: LlamaForCausalLM,
) -> None:
    """Long generations from short prompts: the KV buffers fill up and grow several times, also
    while rows join (right-aligned to a wider batch) and leave (leading padding dropped)."""
    prompts = [[5], [6, 7, 8], list(range(3, 60)), [9, 10]]
    new_tokens = [150, 40, 120, 90]
    expected = {i: reference(tiny_model, p, new_tokens[i]) for i, p in enumerate(prompts)}
    runner = make_runner(HFBatchedRunner, tiny_model)

    got = drive(
        runner,
        prompts,
        joins={0: [0], 5: [1], 37: [2], 70: [3]},
        max_new_tokens=lambda i: len(expected[i]),
    )

    assert got == expected


def test_batch_empties_and_refills(tiny_model: LlamaForCausalLM) -> None:
    runner = make_runner(HFBatchedRunner, tiny_model)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    expected = {i: reference(tiny_model, p, 3) for i, p in enumerate(prompts)}
    budget = {i: len(tokens) for i, tokens in expected.items()}.__getitem__
    first = drive(runner, prompts, joins={0: [0, 1]}, max_new_tokens=budget)
    second = drive(runner, prompts, joins={0: [1], 1: [0]}, max_new_tokens=budget)
    assert first == second == expected


@pytest.mark.parametrize("runner_class", [HFBatchedRunner, HFSequentialRunner])
def test_seeded_sampling_does_not_depend_on_the_batch(
    runner_class: RunnerClass, tiny_model: LlamaForCausalLM
) -> None:
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    others = [SamplingParams(temperature=1.2), seeded, SamplingParams(temperature=0.5, seed=3)]

    alone = drive(
        make_runner(runner_class, tiny_model),
        [prompts[1]],
        joins={0: [0]},
        max_new_tokens=10,
        params=lambda _: seeded,
    )
    crowded = drive(
        make_runner(runner_class, tiny_model),
        prompts,
        joins={0: [0], 2: [1, 2]},
        max_new_tokens=10,
        params=lambda i: others[i],
    )

    assert crowded[1] == alone[0]


def test_running_must_match_what_the_runner_holds(tiny_model: LlamaForCausalLM) -> None:
    runner = make_runner(HFBatchedRunner, tiny_model)
    runner.step(StepBatch(new=[NewSequence(0, [5, 6], GREEDY)], running=[], released=[]))
    with pytest.raises(AssertionError):
        runner.step(StepBatch(new=[], running=[0, 1], released=[]))


def test_tokenizer_normalises_the_chat_template_output() -> None:
    tokenizer = HFTokenizer(
        tiny_tokenizer(), model_name="tiny", eos_token_ids=[0], chat_template=TEMPLATE
    )
    ids = tokenizer.apply_chat_template([ChatMessage("user", "hello")])
    assert isinstance(ids, list)
    assert all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == "<|user|>hello<|assistant|>"
    assert tokenizer.eos_token_ids == frozenset({0, 2})


def test_tokenizer_encodes_and_decodes_from_two_threads_at_once() -> None:
    tokenizer = HFTokenizer(
        tiny_tokenizer(), model_name="tiny", eos_token_ids=[], chat_template=TEMPLATE
    )
    messages = [ChatMessage("user", "hello world, how are you today? " * 20)]
    ids = tokenizer.apply_chat_template(messages)

    encoded: list[list[int]] = []

    def encode() -> None:
        encoded.extend(tokenizer.apply_chat_template(messages) for _ in range(200))

    thread = threading.Thread(target=encode)
    thread.start()
    for _ in range(200):
        tokenizer.decode(ids)
    thread.join()
    assert encoded == [ids] * 200  # an "Already borrowed" in the thread leaves this short


def test_loader_uses_the_chat_template_file(tiny_folder: Path, tmp_path: Path) -> None:
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    runner = load_in_process(
        model=str(tiny_folder), device="cpu", dtype="float32", chat_template=template_file
    )
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "how are you")])
    assert runner.tokenizer.decode(prompt) == "<|user|>how are you<|assistant|>"
    assert runner.tokenizer.eos_token_ids == frozenset({2})
    assert runner.context_window == 256
    assert runner.model_name == tiny_folder.name
    assert isinstance(runner.model, HFPagedRunner)  # a plain Llama: the paged KV pool
    table = range(runner.model.kv_spec.blocks_for(len(prompt)))
    sampled = runner.step(
        StepBatch(new=[NewSequence(0, prompt, GREEDY, block_table=table)], running=[], released=[])
    ).tokens
    assert list(sampled) == [0]


def test_a_head_start_is_only_for_a_model_folder_in_its_own_process(tmp_path: Path) -> None:
    assert head_start(Settings(engine="mock")) is None
    assert head_start(Settings(engine="hf")) is None  # the default GGUF: the load converts it
    assert head_start(Settings(engine="hf", model=str(tmp_path))) is None  # no config.json
    assert head_start(Settings(engine="hf", model="x.gguf")) is None
    assert head_start(Settings(engine="hf", model=str(tmp_path), model_process="off")) is None


def test_the_head_started_model_process_is_the_one_that_serves(
    tiny_folder: Path, tmp_path: Path
) -> None:
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    settings = Settings(
        engine="hf",
        model=str(tiny_folder),
        device="cpu",
        dtype="float32",
        chat_template=template_file,
        cache=tmp_path / "cache",
    )
    started = head_start(settings)
    assert started is not None
    runner = load_hf(settings, started)
    assert isinstance(runner, ProcessRunner)
    assert runner.pid == started.proc.pid  # taken over: no second model process
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "how are you")])
    assert runner.kv_spec is not None
    table = range(runner.kv_spec.blocks_for(len(prompt)))
    sampled = runner.step(
        StepBatch(new=[NewSequence(0, prompt, GREEDY, block_table=table)], running=[], released=[])
    ).tokens
    assert list(sampled) == [0]
    runner.close()
    assert started.proc.poll() is not None


def test_loader_refuses_a_model_without_chat_template(tiny_folder: Path) -> None:
    with pytest.raises(MissingChatTemplate):
        load_in_process(model=str(tiny_folder), device="cpu", dtype="float32")


def test_loader_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(gguf_cache.ModelNotFound):
        load_in_process(model=str(tmp_path), device="cpu")


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """Stand in for the 30 s GGUF read: a tiny model carrying the GGUF quantizer marker, as
    transformers leaves it, and a tokenizer with a chat template. Yields a log of reads."""
    reads: list[str] = []

    def read_model(path: Path) -> PreTrainedModel:
        reads.append("model")
        model = tiny_llama()
        model.hf_quantizer = GgufHfQuantizer(GgufConfig())
        model.config.quantization_config = GgufConfig()
        model.generation_config.eos_token_id = None
        return model

    def read_tokenizer(path: Path) -> PreTrainedTokenizerFast:
        reads.append("tokenizer")
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = TEMPLATE
        return tokenizer

    monkeypatch.setattr(gguf_cache, "read_gguf_model", read_model)
    monkeypatch.setattr(gguf_cache, "read_gguf_tokenizer", read_tokenizer)
    monkeypatch.setattr(gguf_cache, "default_gguf_path", lambda: tmp_path / "model.gguf")
    yield reads


def test_gguf_is_converted_once_into_the_cache(fake_gguf: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = gguf_cache.default_model_folder(cache)
    assert fake_gguf == ["model", "tokenizer"]
    assert folder == cache / "models" / gguf_cache.DEFAULT_MODEL_NAME
    assert "quantization_config" not in (folder / "config.json").read_text()

    runner = load_in_process(model=None, device="cpu", dtype="float32", cache=cache)
    assert fake_gguf == ["model", "tokenizer"]  # loaded from the cache, not converted again
    assert runner.model_name == gguf_cache.DEFAULT_MODEL_NAME
    assert runner.tokenizer.eos_token_ids == frozenset({2})  # filled into the generation config
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "hello")])
    assert runner.tokenizer.decode(prompt) == "<|user|>hello<|assistant|>"
    assert [p.name for p in (cache / "models").iterdir()] == [gguf_cache.DEFAULT_MODEL_NAME]


def test_interrupted_conversion_leaves_no_cache(
    fake_gguf: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.default_model_folder(cache)
    assert list((cache / "models").iterdir()) == []


# The real default model: SmolLM2-135M-Instruct from its GGUF, converted once into the user's cache.


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    return gguf_cache.default_model_folder()


@pytest.fixture(scope="session")
def smollm2(smollm2_folder: Path) -> TokenizedRunner:
    runner = load_in_process(model=None, device="cpu", dtype="float32", batching="on")
    assert isinstance(runner.model, HFPagedRunner)
    return runner


@pytest.mark.model
@pytest.mark.parametrize("runner_class", [HFBatchedRunner, HFSequentialRunner])
def test_smollm2_greedy_equals_generate_alone(
    runner_class: RunnerClass, smollm2: TokenizedRunner
) -> None:
    assert isinstance(smollm2.model, HFPagedRunner)
    model = smollm2.model.model
    runner = TokenizedRunner(runner_class(model), smollm2.tokenizer, smollm2.model_name)
    questions = ["What is 2+2?", "Name a color.", "Write a haiku about the sea.", "Hi"]
    prompts = [runner.tokenizer.apply_chat_template([ChatMessage("user", q)]) for q in questions]
    expected = {i: reference(model, p, 16) for i, p in enumerate(prompts)}

    got = drive(
        runner,
        prompts,
        joins={0: [0, 1], 2: [2], 5: [3]},
        max_new_tokens=lambda i: len(expected[i]),
    )

    assert got == expected
    assert "4" in runner.tokenizer.decode(got[0])


@pytest.mark.model
def test_smollm2_cache_is_a_plain_checkpoint(
    smollm2: TokenizedRunner, smollm2_folder: Path
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_folder.iterdir()}
    assert gguf_cache.default_model_folder() == smollm2_folder
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_folder.iterdir()} == before
    assert "quantization_config" not in (smollm2_folder / "config.json").read_text()
    assert smollm2.tokenizer.eos_token_ids == frozenset({2})  # <|im_end|>
    prompt = smollm2.tokenizer.apply_chat_template([ChatMessage("user", "Hi")])
    assert smollm2.tokenizer.decode(prompt).endswith("user\nHi\nassistant\n")
    assert smollm2.context_window == 8192
