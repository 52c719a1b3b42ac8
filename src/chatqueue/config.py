"""One frozen, validated Settings object: read from flags and CHATQUEUE_* environment in one place."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_cache() -> Path:
    return Path.home() / ".cache" / "chatqueue"


def default_data_dir() -> Path:
    """Conversations, feedback and the session secret: CHATQUEUE_DATA, else the XDG data home."""
    if os.environ.get("CHATQUEUE_DATA"):
        return Path(os.environ["CHATQUEUE_DATA"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatqueue"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATQUEUE_", frozen=True, extra="forbid")

    # the model
    engine: Literal["hf", "mock"] = "hf"
    model: str | None = Field(None, description="Local Hugging Face model folder; default SmolLM2")
    served_model_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batching: Literal["on", "off"] = "on"
    chat_template: Path | None = None
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch")
    kv_cache: Literal["auto", "static", "dynamic"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="Static cache length per slot")
    prefill_chunk: int = Field(512, ge=1, description="Most prompt tokens prefilled a step")
    attention: Literal["auto", "triton", "sdpa"] = "auto"
    model_process: Literal["on", "off"] = Field(
        "on", description="The model in its own process (hf engine), off the event loop's GIL"
    )
    cache: Path = Field(default_factory=default_cache, description="Converted-model cache")

    # the mock engine
    mock_mode: Literal["echo", "lorem"] = "echo"
    mock_delay: float = Field(0.02, ge=0, description="Seconds per step")
    mock_first_token_delay: float = Field(0.0, ge=0)
    mock_lorem_tokens: int = Field(32, ge=1)

    # the queues
    max_concurrent: int = Field(8, ge=1, description="Generations running at once")
    max_queue_size: int = Field(64, ge=0, description="Requests waiting at most")

    # holding under load
    max_queue_per_user: int | None = Field(None, ge=1, description="Waiting requests per user")
    queue_timeout: float | None = Field(None, gt=0, description="Most seconds in the queue")
    step_timeout: float | None = Field(None, gt=0, description="A step longer than this: hung")
    max_unread_tokens: int = Field(4096, ge=1, description="A reader this far behind is cut")
    admit_per_tick: int = Field(
        2, ge=0, description="New POST requests let in per event-loop iteration; 0: no pacing"
    )

    # access and limits
    # NOTE: secrets, so that printing or logging the settings never shows a key.
    api_key: SecretStr | None = Field(None, description="One key for /v1 and /chat (Bearer)")
    api_keys: Path | None = Field(None, description="JSON file: key -> name, priority, limits")
    admin_key: SecretStr | None = Field(None, description="Guards /metrics and /load when set")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens_cap: int | None = Field(None, ge=1, description="Most max_tokens a request gets")
    max_messages: int = Field(512, ge=1)
    timeout_keep_alive: float = Field(5.0, gt=0, description="Idle connection timeout, s")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Allowed origins; none by default"
    )

    # the server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    shutdown_timeout: float = Field(30.0, ge=0, description="Grace for running requests")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # the chat product
    history: str = Field("sqlite", description="sqlite, memory or redis://host:port/db")
    data_dir: Path = Field(default_factory=default_data_dir)
    session_secret: str | None = Field(None, description="Signs cookies; default: in data_dir")
    system_prompt: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _deprecated_names(cls, data: object) -> object:
        """`max_queue` (flag, CHATQUEUE_MAX_QUEUE) is the old name of `max_queue_size`."""
        if isinstance(data, dict):
            old = data.pop("max_queue", None) or os.environ.get("CHATQUEUE_MAX_QUEUE")
            if old is not None and "max_queue_size" not in data:
                warnings.warn(
                    "max_queue is deprecated; use max_queue_size", DeprecationWarning, stacklevel=2
                )
                data["max_queue_size"] = old
        return data

    @field_validator("history")
    @classmethod
    def _history_store(cls, v: str) -> str:
        if v in ("sqlite", "memory") or v.startswith(("redis://", "rediss://", "unix://")):
            return v
        raise ValueError("expected sqlite, memory or a redis:// URL")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: object) -> object:
        """A JSON list (CHATQUEUE_CORS_ORIGINS), or origins separated by commas, in one string or
        several (a repeated flag)."""
        if isinstance(v, str):
            v = json.loads(v) if v.lstrip().startswith("[") else [v]
        if isinstance(v, list | tuple) and all(isinstance(o, str) for o in v):
            return tuple(p.strip() for o in v for p in o.split(",") if p.strip())
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.engine == "mock" and self.model is not None:
            raise ValueError("--model goes with --engine hf, not the mock engine")
        return self
