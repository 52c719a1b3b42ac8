"""`chatqueue serve | chat | bench`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from chatqueue.config import Settings

app = typer.Typer(
    help="Serve a language model as a streaming chat to many people at once.", no_args_is_help=True
)


@app.callback()
def _main() -> None:
    """chatqueue: a bounded request queue and continuous batching in front of one model."""


def _settings(**given: Any) -> Settings:
    """Flags given on the command line win over CHATQUEUE_* variables, which win over defaults."""
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            typer.echo(f"error: {where}: {err['msg']}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    engine: Annotated[str | None, typer.Option(help="hf (a transformers model) or mock")] = None,
    model: Annotated[
        str | None, typer.Option(help="Local HF model folder [default: SmolLM2]")
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id on /v1")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16")] = None,
    batching: Annotated[str | None, typer.Option(help="on (continuous batching) or off")] = None,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file")] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch [all cores but one]")
    ] = None,
    kv_cache: Annotated[
        str | None, typer.Option(help="auto (static on CUDA for Llama-family), static, dynamic")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Static cache length [4096]")] = None,
    prefill_chunk: Annotated[int | None, typer.Option(help="Prompt tokens a step [512]")] = None,
    attention: Annotated[
        str | None, typer.Option(help="Static-cache decode attention: auto, triton, sdpa")
    ] = None,
    model_process: Annotated[
        str | None, typer.Option(help="on (the model in its own process) or off [on]")
    ] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Generations at once [8]")] = None,
    max_queue_size: Annotated[
        int | None, typer.Option(help="Requests waiting at most [64]")
    ] = None,
    max_queue_per_user: Annotated[
        int | None, typer.Option(help="Waiting per user [no cap]")
    ] = None,
    queue_timeout: Annotated[float | None, typer.Option(help="Most s in the queue [none]")] = None,
    step_timeout: Annotated[
        float | None, typer.Option(help="A step this long: hung [none]")
    ] = None,
    max_unread_tokens: Annotated[
        int | None, typer.Option(help="Cut readers this far behind")
    ] = None,
    admit_per_tick: Annotated[
        int | None, typer.Option(help="New requests let in per loop iteration; 0: off [2]")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Bearer key for /v1 and /chat")] = None,
    api_keys: Annotated[
        Path | None, typer.Option(help='JSON: {"<key>": {"name", "priority", "max_queue"}}')
    ] = None,
    admin_key: Annotated[str | None, typer.Option(help="Bearer key for /metrics, /load")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest body [1000000]")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Longest prompt [none]")] = None,
    max_tokens_cap: Annotated[int | None, typer.Option(help="Most max_tokens [none]")] = None,
    max_messages: Annotated[int | None, typer.Option(help="Most messages [512]")] = None,
    timeout_keep_alive: Annotated[float | None, typer.Option(help="Idle connection s [5]")] = None,
    cors_origins: Annotated[
        list[str] | None, typer.Option(help="Allowed origins, comma-separated or repeated")
    ] = None,
    mock_mode: Annotated[str | None, typer.Option(help="echo or lorem")] = None,
    mock_delay: Annotated[float | None, typer.Option(help="Mock seconds per step [0.02]")] = None,
    mock_first_token_delay: Annotated[float | None, typer.Option(help="Mock prefill s")] = None,
    mock_lorem_tokens: Annotated[int | None, typer.Option(help="Mock lorem length")] = None,
    host: Annotated[str | None, typer.Option(help="[127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="[8000]")] = None,
    shutdown_timeout: Annotated[float | None, typer.Option(help="Drain grace, s [30]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    history: Annotated[str | None, typer.Option(help="sqlite, memory or redis://h:p/db")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Chat history, secret [~/.local/share]")
    ] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt of /chat")] = None,
) -> None:
    """Run the HTTP server. Every flag can also come from CHATQUEUE_<FLAG> in the environment."""
    given = dict(locals())
    # NOTE: OpenMP threads that spin while waiting made 2-thread CPU forwards here intermittently
    # 30x slower next to the busy event loop; passive waiting must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from chatqueue.server.auth import KeyFileError
    from chatqueue.server.serve import serve as run

    try:
        run(_settings(**given))
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="A running chatqueue (or OpenAI-compatible) server")] = (
        "http://127.0.0.1:8000"
    ),
    requests: Annotated[int, typer.Option(help="Requests in all")] = 64,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once")] = 16,
    prompt: Annotated[str, typer.Option(help="The user message")] = "Tell me about Tokyo.",
    max_tokens: Annotated[int, typer.Option(help="max_tokens per request")] = 64,
) -> None:
    """Load a running server with concurrent streamed chats; report what the clients saw."""
    import asyncio

    from chatqueue.bench import run_bench

    report = asyncio.run(
        run_bench(
            url=url.rstrip("/"),
            requests=requests,
            concurrency=concurrency,
            prompt=prompt,
            max_tokens=max_tokens,
        )
    )
    for line in report.lines():
        typer.echo(line)


@app.command()
def chat(
    url: Annotated[
        str | None, typer.Option(help="A running server (http://host:port); else in-process")
    ] = None,
    engine: Annotated[str | None, typer.Option(help="hf or mock (in-process)")] = None,
    model: Annotated[str | None, typer.Option(help="Local HF model folder (in-process)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (in-process)")] = None,
    mock_mode: Annotated[str | None, typer.Option(help="echo or lorem")] = None,
    mock_delay: Annotated[float | None, typer.Option(help="Mock seconds per step")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt (in-process)")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens a reply takes")] = None,
) -> None:
    """Chat in the console; the reply streams as it is generated."""
    from chatqueue.console import LocalChat, RemoteChat, run_console
    from chatqueue.history.types import ChatParams

    wanted = {"temperature": temperature, "max_tokens": max_tokens}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if url is not None:
        run_console(RemoteChat(url, wanted))
        return
    settings = _settings(
        engine=engine,
        model=model,
        device=device,
        mock_mode=mock_mode,
        mock_delay=mock_delay,
        system_prompt=system_prompt,
    )
    run_console(LocalChat(settings, ChatParams(**wanted)))  # type: ignore[arg-type]
