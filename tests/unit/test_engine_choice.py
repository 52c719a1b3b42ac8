"""Which engine `--engine auto` picks for a model, without loading anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from chatqueue.api import build
from chatqueue.config import Settings


@pytest.fixture
def llama_cpp_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "llama_cpp" else real(name, *a),
    )


@pytest.mark.usefixtures("llama_cpp_installed")
def test_auto_runs_a_gguf_on_llamacpp_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(build, "_nvidia_gpu_visible", lambda: False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert build.engine_for(Settings()) == "llamacpp"  # the default model is a GGUF
    assert build.engine_for(Settings(model=str(gguf))) == "llamacpp"
    assert build.engine_for(Settings(model=str(tmp_path))) == "hf"  # a model folder
    assert build.engine_for(Settings(device="cuda")) == "hf"
    assert build.engine_for(Settings(engine="hf")) == "hf"
    assert build.engine_for(Settings(max_concurrent=8)) == "llamacpp"
    assert build.engine_for(Settings(max_concurrent=32)) == "llamacpp"  # TTFT, issue 17
    assert build.engine_for(Settings(max_concurrent=33)) == "hf"  # unmeasured: fp32 GEMMs scale
    assert build.engine_for(Settings(batching="off")) == "hf"


@pytest.mark.usefixtures("llama_cpp_installed")
def test_auto_keeps_the_gpu_for_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_nvidia_gpu_visible", lambda: True)
    assert build.engine_for(Settings()) == "hf"
    assert build.engine_for(Settings(device="cpu")) == "llamacpp"


def test_llamacpp_takes_only_a_gguf_file() -> None:
    with pytest.raises(ValueError, match=r"must name a \.gguf"):
        Settings(engine="llamacpp", model="/some/folder")
