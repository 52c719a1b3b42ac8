"""`chatqueue serve | chat | bench`. The settings' flags are made from config.Settings, where each
is written once."""

from __future__ import annotations

import inspect
import os
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

import typer
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape

from chatqueue.config import RENAMED, Settings

app = typer.Typer(
    help="Serve a language model as a streaming chat to many people at once.", no_args_is_help=True
)

Command = TypeVar("Command", bound=Callable[..., None])


@app.callback()
def _main() -> None:
    """chatqueue: a bounded request queue and continuous batching in front of one model."""


def settings_flags(*names: str) -> Callable[[Command], Command]:
    """Gives a command a flag for each named Settings field (every field when none is named),
    after its own parameters; the command takes them in its **kwargs, None where not given."""

    def add(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters.values()
        flags = _flags(names or tuple(Settings.model_fields))
        params = [p for p in own if p.kind is not p.VAR_KEYWORD] + flags
        # typer reads a command's parameters from its signature.
        cast(Any, command).__signature__ = inspect.Signature(params)
        return command

    return add


def _flags(names: tuple[str, ...]) -> list[inspect.Parameter]:
    fields = Settings.model_fields
    flags = [_flag(name, fields[name]) for name in names]
    renamed = [(old, new) for old, new in RENAMED.items() if new in names]
    return flags + [_flag(old, fields[new], renamed_to=new) for old, new in renamed]


def _flag(name: str, field: FieldInfo, *, renamed_to: str | None = None) -> inspect.Parameter:
    """--kebab-case; typer only parses the value, Settings validates it."""
    kind, choices = _flag_type(field.annotation)
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        flag += f"/--no-{flag[2:]}"
    if renamed_to is None:
        text = _help(f"CHATQUEUE_{name.upper()}", field, choices)
    else:
        text = f"Deprecated: use --{renamed_to.replace('_', '-')}"
    option = typer.Option(None, flag, help=text, show_default=False, hidden=renamed_to is not None)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
    )


def _flag_type(annotation: Any) -> tuple[Any, tuple[str, ...]]:
    """What typer parses a field's flag as, and the values it may take where they are few."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return str, get_args(annotation)
    if get_origin(annotation) is tuple and get_args(annotation) == (str, ...):
        return list[str], ()  # a repeated flag
    if annotation is SecretStr:
        return str, ()
    if annotation in (bool, int, float, str, Path):
        return annotation, ()
    raise TypeError(f"no flag for a setting of type {annotation}")


def _help(env: str, field: FieldInfo, choices: tuple[str, ...]) -> str:
    # NOTE: choices, env var and default go in the text, not in typer's columns: a column of
    # choices squeezed the help to 23 characters at 80 columns, too few for most env var names;
    # and typer shows an env var only where click itself reads it, while Settings reads them here.
    notes = [f"[env var: {env}]"]
    if choices:
        notes.insert(0, f"[choices: {', '.join(choices)}]")
    default = field.get_default(call_default_factory=True)
    if default not in (None, ()):
        notes.append(f"[default: {default}]")
    text = " ".join([field.description or "", *notes])
    return escape(text) if app.rich_markup_mode == "rich" else text


def _settings(**given: Any) -> Settings:
    """Flags given on the command line win over CHATQUEUE_* variables, which win over defaults."""
    try:
        with _deprecations_on_stderr():
            return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            typer.echo(f"error: {where}: {err['msg']}", err=True)
        raise typer.Exit(2) from exc


@contextmanager
def _deprecations_on_stderr() -> Iterator[None]:
    """Says on stderr what is deprecated (DeprecationWarning is silent outside __main__), and still
    warns, for callers that look for warnings."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            yield
    finally:
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
            warnings.warn(w.message, stacklevel=3)


@app.command()
@settings_flags()
def serve(**given: Any) -> None:
    """Run the HTTP server. Every flag can also come from CHATQUEUE_<FLAG> in the environment; a
    flag given wins."""
    # NOTE: OpenMP threads that spin while waiting made 2-thread CPU forwards here intermittently
    # 30x slower next to the busy event loop; passive waiting must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    settings = _settings(**given)
    if settings.is_cluster:
        _serve_cluster(settings)
        return
    from chatqueue.engine.loading import head_start

    model_process = head_start(settings)  # before the server's imports: they overlap its own
    from chatqueue.server.auth import KeyFileError

    try:
        if settings.api_servers > 1:
            from chatqueue.api.build import chat_queue_for
            from chatqueue.fronts.launch import serve_api_servers

            cq = chat_queue_for(settings, model_process=model_process)
            serve_api_servers(settings, chat_queue=cq)
        else:
            from chatqueue.server.serve import serve as run

            run(settings, model_process=model_process)
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _serve_cluster(settings: Settings) -> None:
    """--replicas, --min/--max-replicas or --ray-address: replicas on Ray Serve."""
    try:
        from chatqueue.cluster import serve_cluster
        from chatqueue.cluster.checks import ClusterConfigError
        from chatqueue.server.auth import KeyFileError
    except ImportError as exc:
        typer.echo(
            f"error: serving replicas needs Ray Serve ({exc}): pip install 'chatqueue[cluster]'",
            err=True,
        )
        raise typer.Exit(2) from exc
    try:
        serve_cluster(settings)
    except (ClusterConfigError, KeyFileError) as exc:
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
@settings_flags("engine", "model", "device", "mock_mode", "mock_delay", "system_prompt")
def chat(
    url: Annotated[
        str | None, typer.Option(help="A running server (http://host:port); else in-process")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens a reply takes")] = None,
    **in_process: Any,
) -> None:
    """Chat in the console; the reply streams as it is generated. Without --url the model runs in
    this process, with the settings' flags below."""
    from chatqueue.console import LocalChat, RemoteChat, run_console
    from chatqueue.history.types import ChatParams

    wanted = {"temperature": temperature, "max_tokens": max_tokens}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if url is not None:
        run_console(RemoteChat(url, wanted))
        return
    settings = _settings(**in_process)
    run_console(LocalChat(settings, ChatParams(**wanted)))  # type: ignore[arg-type]


if __name__ == "__main__":
    app()
