"""The CLI's flags are made from Settings: one flag a field, parsed by typer, validated by Settings,
over CHATQUEUE_* environment; the model and the server are never started here."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic.fields import FieldInfo
from typer.testing import CliRunner, Result

from chatqueue import cli
from chatqueue.config import RENAMED, Settings


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """`chatqueue serve` with the server replaced: the Settings it would have served."""
    import chatqueue.server.serve

    seen: list[Settings] = []

    def served(settings: Settings, **_: object) -> None:
        seen.append(settings)

    monkeypatch.setattr(chatqueue.server.serve, "serve", served)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # serve sets it; put back after the test
    return seen


def serve(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.app, ["serve", *args], env=env)


def options(command: str) -> dict[str, list[str]]:
    group = typer.main.get_command(cli.app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {p.name: p.opts for p in params if p.name != "help"}


def test_every_setting_has_a_described_serve_flag() -> None:
    flags = options("serve")
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert flags[name] == ["--" + name.replace("_", "-")]
    assert set(flags) == set(Settings.model_fields) | set(RENAMED)


def test_chat_takes_the_in_process_settings_and_its_own() -> None:
    own = {"url", "temperature", "max_tokens"}
    shared = {"engine", "model", "device", "mock_mode", "mock_delay", "system_prompt"}
    assert set(options("chat")) == own | shared


def test_help_names_each_flag_its_variable_and_default() -> None:
    out = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "250"}).output
    for name in Settings.model_fields:
        line = next(x for x in out.splitlines() if f"--{name.replace('_', '-')} " in x)
        assert f"[env var: CHATQUEUE_{name.upper()}]" in line
    assert "[choices: auto, hf, llamacpp, mock] [env var: CHATQUEUE_ENGINE] [default: auto]" in out
    assert "[env var: CHATQUEUE_MAX_QUEUE_SIZE] [default: 64]" in out
    assert not re.search(r"--max-queue\b(?!-)", out), "a deprecated flag is not offered"


def test_flag_wins_over_environment_which_wins_over_default(served: list[Settings]) -> None:
    env = {"CHATQUEUE_MAX_CONCURRENT": "3", "CHATQUEUE_PORT": "9001"}
    r = serve("--engine", "mock", "--max-concurrent", "5", env=env)
    assert r.exit_code == 0, r.output
    (s,) = served
    assert (s.max_concurrent, s.port, s.max_queue_size) == (5, 9001, 64)


def test_flags_of_each_kind(served: list[Settings]) -> None:
    args = ["--engine", "mock", "--mock-delay", "0.5", "--api-key", "sk-1", "--chat-template"]
    args += ["t.jinja", "--cors-origins", "http://a", "--cors-origins", "http://b,http://c"]
    r = serve(*args, env={"CHATQUEUE_CORS_ORIGINS": '["http://env"]'})
    assert r.exit_code == 0, r.output
    (s,) = served
    assert (s.engine, s.mock_delay, s.chat_template) == ("mock", 0.5, Path("t.jinja"))
    assert s.api_key is not None and s.api_key.get_secret_value() == "sk-1"
    assert s.cors_origins == ("http://a", "http://b", "http://c")


def test_a_list_from_the_environment_when_no_flag_is_given(served: list[Settings]) -> None:
    r = serve("--engine", "mock", env={"CHATQUEUE_CORS_ORIGINS": '["http://env"]'})
    assert r.exit_code == 0, r.output
    assert served[0].cors_origins == ("http://env",)


def test_a_bool_setting_gets_a_flag_pair() -> None:
    seen: list[Any] = []
    field = FieldInfo.from_annotated_attribute(bool, False)
    command = typer.Typer()

    @command.command()
    def probe(**given: Any) -> None:
        seen.append(given["verbose"])

    probe.__signature__ = inspect.Signature([cli._flag("verbose", field)])  # type: ignore[attr-defined]
    for args in (["--verbose"], ["--no-verbose"], []):
        assert CliRunner().invoke(command, args).exit_code == 0
    assert seen == [True, False, None]


def test_bad_value_exits_2_naming_the_setting(served: list[Settings]) -> None:
    r = serve("--engine", "nope")
    assert r.exit_code == 2
    assert "error: engine: Input should be 'auto', 'hf', 'llamacpp' or 'mock'" in r.stderr
    assert not served


def test_the_old_flag_still_works_and_says_it_is_deprecated(served: list[Settings]) -> None:
    with pytest.warns(DeprecationWarning, match="max_queue .* is deprecated; use max_queue_size"):
        r = serve("--engine", "mock", "--max-queue", "7")
    assert r.exit_code == 0, r.output
    assert served[0].max_queue_size == 7
    assert "warning: max_queue (--max-queue, CHATQUEUE_MAX_QUEUE) is deprecated" in r.stderr


def test_the_old_flag_wins_over_the_new_variable(served: list[Settings]) -> None:
    with pytest.warns(DeprecationWarning):
        serve("--engine", "mock", "--max-queue", "7", env={"CHATQUEUE_MAX_QUEUE_SIZE": "5"})
    assert served[0].max_queue_size == 7


@pytest.mark.parametrize(
    ("env", "size"),
    [
        ({"CHATQUEUE_MAX_QUEUE": "7"}, 7),
        ({"CHATQUEUE_MAX_QUEUE": "7", "CHATQUEUE_MAX_QUEUE_SIZE": "5"}, 5),
    ],
)
def test_the_old_variable_counts_below_the_new_one(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], size: int
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.warns(DeprecationWarning):
        assert Settings().max_queue_size == size
    with pytest.warns(DeprecationWarning):
        assert Settings(max_queue_size=9).max_queue_size == 9
