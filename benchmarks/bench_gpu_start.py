"""How long `chatqueue serve --model DIR` takes to become ready on a GPU, and to come back after its
model process is killed.

A Llama-3.2-1B-shaped model with random bf16 weights, saved once as a local HF folder (with a
small tokenizer and a chat template). Three figures, in one run:
  - cold start: an empty chatqueue cache (nothing compiled yet): load, compile the decode step,
    capture its CUDA graphs;
  - warm start: the same model again, the compiled code in the cache (a new server process;
    `--warm-starts N`: the median of N);
  - restart: the model process SIGKILLed under the warm server, until /health is ok again: once
    after `--settle` seconds (the spare process has imported torch and prepared the GPU, as it
    has long done when a model process dies in service), once again at once after that restart
    (the new spare still starting).
Each server answers one request before it is timed as done.

    python3 benchmarks/bench_gpu_start.py [--work DIR] [--settle 20] [--warm-starts 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests.support.servers import free_port, model_process  # noqa: E402


def make_model_folder(folder: Path) -> None:
    import torch

    from gpu_model import build_model
    from tests.integration.test_hf_runner import TEMPLATE
    from tests.support.tiny_tokenizer import tiny_tokenizer

    if (folder / "config.json").is_file():
        return
    model = build_model("cuda", torch.bfloat16)
    model.save_pretrained(folder)
    del model
    fast = tiny_tokenizer()
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)


def wait_status(url: str, status: str, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            said = httpx.get(f"{url}/health", timeout=5).json()
        except httpx.HTTPError:
            said = {}
        if said.get("status") == status:
            return
        if said.get("status") == "failed":
            raise RuntimeError(f"the server failed: {said}")
        time.sleep(0.05)
    raise TimeoutError(f"/health never said {status}")


def ask(url: str) -> int:
    body = {
        "messages": [{"role": "user", "content": "What is the capital of Japan?"}],
        "max_tokens": 16,
        "ignore_eos": True,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def start(
    folder: Path,
    cache: Path,
    log: Path,
    *,
    flags: tuple[str, ...] = ("--max-concurrent", "64"),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "chatqueue.cli", "serve", "--model", str(folder)]
    cmd += ["--cache", str(cache), "--port", str(port), *flags]
    t0 = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_status(url, "ok", proc, 900)
    assert ask(url) == 16
    return proc, url, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/cq-start")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds before the first kill")
    ap.add_argument("--warm-starts", type=int, default=1, help="warm starts to time (median)")
    args = ap.parse_args()
    work = Path(args.work)
    folder, cache = Path("/tmp/cq-llama1b"), work / "cache"
    log = Path(os.environ.get("OUT", work)) / "servers.log"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_model_folder(folder)
    print(f"model folder ready in {time.perf_counter() - t0:.1f} s", flush=True)

    proc, _, cold = start(folder, cache, log)
    print(f"cold start (empty cache): {cold:.1f} s to ready and one answer", flush=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)

    proc, url, warm = start(folder, cache, log)
    print(f"warm start (cache kept): {warm:.1f} s", flush=True)
    time.sleep(args.settle)
    restart = kill_and_wait(proc, url)
    print(f"restart after SIGKILL, spare prepared: {restart:.1f} s to ok and one answer")
    unprepared = kill_and_wait(proc, url)
    print(f"restart after SIGKILL at once after that: {unprepared:.1f} s", flush=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    warms = [warm]
    for _ in range(args.warm_starts - 1):
        proc, _, again = start(folder, cache, log)
        print(f"warm start again: {again:.1f} s", flush=True)
        warms.append(again)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    warm = statistics.median(warms)
    print("| cold start | warm start | restart (spare prepared) | restart (spare starting) |")
    print(f"| {cold:.1f} s | {warm:.1f} s | {restart:.1f} s | {unprepared:.1f} s |")


def kill_and_wait(proc: subprocess.Popen[bytes], url: str) -> float:
    """SIGKILL the model process; seconds until /health is ok and a request is answered."""
    killed = time.perf_counter()
    os.kill(model_process(proc.pid), signal.SIGKILL)
    wait_status(url, "restarting", proc, 60)
    wait_status(url, "ok", proc, 900)
    assert ask(url) == 16
    return time.perf_counter() - killed


if __name__ == "__main__":
    main()
