"""A model-free server for measuring the front end: a fake model that takes a fixed time a step (in
its own process, as the real model is), behind a real tokenizer and chat template, served as
`chatqueue serve` serves (uvicorn, httptools, the same app).

Run as a script it serves over HTTP, for bench_front_lag.py (chatqueue imported from PYTHONPATH,
else the installed one):
    python benchmarks/front_model.py --port 8000 --max-concurrent 256 --step-ms 3
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

from chatqueue.engine.runner import StepBatch, StepOutput
from chatqueue.types import ChatMessage
from lag_recorder import add_lag_recorder

TOKENIZER = Path(__file__).resolve().parents[1] / ".bench" / "smollm2-tokenizer"
MODEL_NAME = "fake"


class FakeModel:
    """A step sleeps `step_s` (a batched forward's time, whatever the batch), then every row gets
    the next of `reply` (token ids that decode to plain words), round and round."""

    def __init__(self, step_s: float, reply: Sequence[int]) -> None:
        self.step_s = step_s
        self.reply = list(reply)
        self._next: dict[int, int] = {}

    @property
    def context_window(self) -> int:
        return 4096

    def step(self, batch: StepBatch) -> StepOutput:
        for rid in batch.released:
            self._next.pop(rid, None)
        for new in batch.new:
            self._next[new.rid] = 0
        if self.step_s:
            time.sleep(self.step_s)
        tokens = {}
        for rid in itertools.chain((n.rid for n in batch.new), batch.running):
            i = self._next[rid]
            tokens[rid] = self.reply[i % len(self.reply)]
            self._next[rid] = i + 1
        return StepOutput(tokens)

    def close(self) -> None:
        self._next.clear()


class StandInTokenizer:
    """GPU benchmark's kind (gpu_model.PromptTokenizer, without torch): a prompt is 256 ids from
    the text's hash, an id decodes to a short word. What a real tokenizer costs is left out."""

    eos_token_ids = frozenset({0})

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        seed = hash(messages[-1].content)
        return [1000 + (seed + 7919 * i) % 40000 for i in range(256)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(f" w{t % 1000}" for t in token_ids)


def real_tokenizer():  # type: ignore[no-untyped-def]
    from chatqueue.text.hf_tokenizer import load_tokenizer

    return load_tokenizer(TOKENIZER, model_name=MODEL_NAME, chat_template=None)


def reply_ids() -> list[int]:
    """Plain English words in SmolLM2's vocabulary (the stand-in decodes any id)."""
    text = " The quick brown fox jumps over the lazy dog, and then it runs far away." * 4
    return real_tokenizer().encode(text)


def fake_model(step_s: float, reply: list[int]) -> FakeModel:
    """Module-level, so the model process can unpickle it."""
    return FakeModel(step_s, reply)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-concurrent", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=3.0)
    ap.add_argument("--tokenizer", choices=["real", "stand-in"], default="real")
    ap.add_argument("--model-process", choices=["on", "off"], default="on")
    args, rest = ap.parse_known_args()  # the rest: `chatqueue serve` flags

    import front_model  # this file by its module name: the model process unpickles from it
    from chatqueue import ChatQueue
    from chatqueue.config import Settings
    from chatqueue.engine.process.runner import ProcessRunner
    from chatqueue.engine.runner import TokenizedRunner
    from chatqueue.server import serve

    tokenizer = real_tokenizer() if args.tokenizer == "real" else StandInTokenizer()
    load = functools.partial(front_model.fake_model, args.step_ms / 1e3, reply_ids())
    runner = (
        functools.partial(ProcessRunner, load, tokenizer=tokenizer, model_name=MODEL_NAME)
        if args.model_process == "on"
        else TokenizedRunner(load(), tokenizer, MODEL_NAME)
    )
    n = args.max_concurrent
    settings = Settings(
        engine="mock", port=args.port, log_level="warning", **_flags(rest)
    )  # fmt: skip
    extra = (
        {"stream_interval": settings.stream_interval}
        if "stream_interval" in rest_names(rest)
        else {}
    )
    cq = ChatQueue(runner, max_concurrent=n, max_queue_size=n, **extra)
    if settings.api_servers > 1:
        from chatqueue.fronts.launch import serve_api_servers

        serve_api_servers(settings, chat_queue=cq, on_app=add_lag_recorder)
    else:
        serve.serve(settings, chat_queue=cq, on_app=add_lag_recorder)


def rest_names(rest: list[str]) -> set[str]:
    return set(_flags(rest))


def _flags(rest: list[str]) -> dict[str, str]:
    """`--admit-per-tick 2` -> {"admit_per_tick": "2"}."""
    return {k.lstrip("-").replace("-", "_"): v for k, v in zip(rest[::2], rest[1::2], strict=True)}


if __name__ == "__main__":
    main()
