"""One frozen, validated Settings object: read from flags and CHATQUEUE_* environment in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache() -> Path:
    return Path.home() / ".cache" / "chatqueue"


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
    cache: Path = Field(default_factory=default_cache, description="Converted-model cache")

    # the mock engine
    mock_mode: Literal["echo", "lorem"] = "echo"
    mock_delay: float = Field(0.02, ge=0, description="Seconds per step")
    mock_first_token_delay: float = Field(0.0, ge=0)
    mock_lorem_tokens: int = Field(32, ge=1)

    # the queues
    max_concurrent: int = Field(8, ge=1, description="Generations running at once")
    max_queue: int = Field(64, ge=0, description="Requests waiting at most")

    # the server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    shutdown_timeout: float = Field(30.0, ge=0, description="Grace for running requests")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.engine == "mock" and self.model is not None:
            raise ValueError("--model goes with --engine hf, not the mock engine")
        return self
