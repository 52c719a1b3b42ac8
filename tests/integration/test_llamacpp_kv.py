"""llama.cpp's KV cache kind: measured once on this CPU and kept (`--llamacpp-kv auto`), or as
named."""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest

from chatqueue.config import Settings
from chatqueue.engine.hf.gguf_cache import default_gguf_path
from chatqueue.engine.llamacpp import kv_choice
from chatqueue.engine.llamacpp.loader import load_llamacpp_runner

pytestmark = pytest.mark.model


def settings(tmp_path: Path, kv: str) -> Settings:
    return Settings(
        engine="llamacpp",
        llamacpp_kv=kv,  # type: ignore[arg-type]
        cache=tmp_path / "cache",
        max_concurrent=2,
        max_model_len=256,
    )


def test_auto_measures_every_kind_once_and_keeps_the_fastest(tmp_path: Path) -> None:
    s = settings(tmp_path, "auto")
    runner = load_llamacpp_runner(s, default_gguf_path(), threads=1)
    chosen = runner.info["kv_cache"]
    runner.close()
    kept = json.loads((s.cache / "llamacpp" / "kv-choice.json").read_text())
    (entry,) = kept.values()
    assert set(entry["ms"]) == set(kv_choice.KINDS)
    assert all(len(ms) == len(kv_choice.POSITIONS) and min(ms) > 0 for ms in entry["ms"].values())
    assert chosen == entry["kind"] == min(entry["ms"], key=lambda k: math.prod(entry["ms"][k]))

    with mock.patch.object(kv_choice, "measure", side_effect=AssertionError("measured again")):
        again = load_llamacpp_runner(s, default_gguf_path(), threads=1)
    assert again.info["kv_cache"] == chosen
    again.close()


@pytest.mark.parametrize("kind", sorted(kv_choice.KINDS))
def test_a_kind_named_is_used_as_it_is(tmp_path: Path, kind: str) -> None:
    s = settings(tmp_path, kind)
    with mock.patch.object(kv_choice, "measure", side_effect=AssertionError("measured")):
        runner = load_llamacpp_runner(s, default_gguf_path(), threads=1)
    assert runner.info["kv_cache"] == kind
    runner.close()
    assert not (s.cache / "llamacpp").exists()


def test_a_measurement_that_fails_serves_on_q8_0_and_measures_again_next_time(
    tmp_path: Path,
) -> None:
    s = settings(tmp_path, "auto")
    with mock.patch.object(kv_choice, "measure", side_effect=RuntimeError("no memory")):
        runner = load_llamacpp_runner(s, default_gguf_path(), threads=1)
    assert runner.info["kv_cache"] == kv_choice.FALLBACK
    runner.close()
    assert not (s.cache / "llamacpp" / "kv-choice.json").exists()
