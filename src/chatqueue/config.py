"""One frozen, validated Settings object: read from flags and CHATQUEUE_* environment in one place."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_cache() -> Path:
    return Path.home() / ".cache" / "chatqueue"


def default_data_dir() -> Path:
    """Conversations, feedback and the session secret: CHATQUEUE_DATA, else the XDG data home."""
    if os.environ.get("CHATQUEUE_DATA"):
        return Path(os.environ["CHATQUEUE_DATA"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatqueue"


# A renamed setting: old name -> new name. The old keyword, flag and CHATQUEUE_<OLD> variable
# keep working, with a DeprecationWarning.
RENAMED: dict[str, str] = {"max_queue": "max_queue_size"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATQUEUE_", frozen=True, extra="forbid")

    # the model
    engine: Literal["auto", "hf", "llamacpp", "mock"] = Field(
        "auto",
        description="hf: transformers; llamacpp: a GGUF on llama.cpp; mock: a fake; "
        "auto: llamacpp for a GGUF with no GPU, else hf",
    )
    model: str | None = Field(
        None, description="Local Hugging Face model folder or .gguf file; default: SmolLM2"
    )
    served_model_name: str | None = Field(None, description="Model id on /v1; default: the model's")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when torch sees one"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA"
    )
    batching: Literal["on", "off"] = Field(
        "on", description="on: continuous batching; off: one request at a time, batch 1"
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template file; overrides the model's own"
    )
    tool_call_format: Literal["auto", "hermes", "llama3_json"] = Field(
        "auto",
        description="How the model writes tool calls; auto: Llama 3's JSON if its template is "
        "Llama 3's, else Hermes <tool_call>",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch or llama.cpp; default: all cores but one"
    )
    kv_cache: Literal["auto", "paged", "static", "dynamic"] = Field(
        "auto",
        description="auto: on CUDA paged or static for the families in the README, else dynamic",
    )
    llamacpp_kv: Literal["auto", "q8_0", "f16", "f16-noflash"] = Field(
        "auto",
        description="llama.cpp's KV cache (f16-noflash: without flash attention); "
        "auto: the fastest here, measured once",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Static cache (and llama.cpp) tokens a slot (prompt + reply); default: 4096",
    )
    prefill_chunk: int = Field(
        512,
        ge=1,
        description="Most prompt tokens prefilled a step (beside the step's decode tokens)",
    )
    prefill_stall_limit: float = Field(
        2.0,
        ge=0,
        description="While streams decode, a step's prompt tokens keep it within this many "
        "decode steps (measured; more where more prompts wait than streams decode); 0: off",
    )
    kv_cache_memory: str | None = Field(
        None,
        description="Paged KV pool size: bytes (4GiB, 512MiB, 1e9) or a fraction of free memory "
        "(0.3); default: max-concurrent full contexts, within a quarter of free memory",
    )
    kv_cache_blocks: int | None = Field(
        None, ge=1, description="Paged KV pool size in blocks (wins over --kv-cache-memory)"
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="Tokens a KV cache block holds")
    prefix_caching: Literal["on", "off"] = Field(
        "on",
        description="Reuse the KV of a cached prompt prefix (the paged KV pool; llama.cpp's slots)",
    )
    attention: Literal["auto", "triton", "sdpa"] = Field(
        "auto", description="Static-cache decode attention; auto: Triton where it runs, else SDPA"
    )
    model_process: Literal["on", "off"] = Field(
        "on", description="The model in its own process (hf engine), off the event loop's GIL"
    )
    cache: Path = Field(default_factory=default_cache, description="Converted-model cache")

    # the mock engine
    mock_mode: Literal["echo", "lorem"] = Field(
        "echo", description="Mock replies: the last user message again, or a fixed lorem text"
    )
    mock_delay: float = Field(0.02, ge=0, description="Mock seconds per step")
    mock_first_token_delay: float = Field(0.0, ge=0, description="Mock seconds of prefill")
    mock_lorem_tokens: int = Field(32, ge=1, description="Mock lorem reply length, tokens")

    # the queues
    max_concurrent: int = Field(8, ge=1, description="Generations running at once")
    max_queue_size: int = Field(64, ge=0, description="Requests waiting at most; one more: 429")

    # holding under load
    max_queue_per_user: int | None = Field(
        None, ge=1, description="Waiting requests per user; default: no cap"
    )
    queue_timeout: float | None = Field(
        None, gt=0, description="Most seconds in the queue, then 503; default: none"
    )
    step_timeout: float | None = Field(
        None,
        gt=0,
        description="A model step longer than this, s, is a hang; "
        "default: 20x the longest recent step, at least 30 s",
    )
    model_restarts: int = Field(
        5,
        ge=0,
        description="Restarts of a dead or hung model process within 10 minutes, then failed; "
        "0: never restart",
    )
    max_unread_tokens: int = Field(4096, ge=1, description="A reader this far behind is cut")
    stream_interval: int = Field(
        1, ge=1, description="A stream's text goes out every N tokens (first and last at once)"
    )
    overlap_steps: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The model process runs a step while the last one's tokens are handled",
    )
    admit_per_tick: int = Field(
        2, ge=0, description="New POST requests let in per event-loop iteration; 0: no pacing"
    )

    # access and limits
    # NOTE: secrets, so that printing or logging the settings never shows a key.
    api_key: SecretStr | None = Field(None, description="One key for /v1 and /chat (Bearer)")
    api_keys: Path | None = Field(
        None, description='JSON file: {"<key>": {"name", "priority", "max_queue", "rate_limit"}}'
    )
    admin_key: SecretStr | None = Field(None, description="Guards /metrics and /load when set")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body, bytes")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest prompt; default: none")
    max_tokens_cap: int | None = Field(None, ge=1, description="Most max_tokens a request gets")
    max_messages: int = Field(512, ge=1, description="Most messages in a request")
    timeout_keep_alive: float = Field(5.0, gt=0, description="Idle connection timeout, s")
    header_timeout: float = Field(
        10.0, gt=0, description="Most seconds to receive a request's line and headers"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Most seconds to receive a request's body after its headers"
    )
    rate_limit: float | None = Field(
        None, gt=0, description="Requests a minute per caller (key holder, else address)"
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Allowed origins, comma-separated or repeated; default: none (CORS off)"
    )

    # the server
    gc_threshold: int = Field(
        100_000, ge=1, description="Allocations between young garbage collections (Python's: 700)"
    )
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")
    shutdown_timeout: float = Field(30.0, ge=0, description="Grace for running requests, s")
    api_servers: int = Field(
        1, ge=1, description="HTTP server processes over the one queue (the streams' writes)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")

    # the cluster (the chatqueue[cluster] extra: Ray Serve)
    replicas: int | None = Field(
        None, ge=1, description="Serve N replicas (one model each) on Ray Serve; default: no Ray"
    )
    min_replicas: int | None = Field(
        None, ge=1, description="Autoscale from this many replicas (with --max-replicas)"
    )
    max_replicas: int | None = Field(
        None, ge=1, description="Autoscale up to this many replicas, driven by queue depth"
    )
    ray_address: str | None = Field(
        None, description="Join this Ray cluster (auto, host:port); default: start a local one"
    )
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    replica_gpus: float | None = Field(
        None, ge=0, description="GPUs for each replica; default: 1 if the cluster has GPUs (hf)"
    )
    cluster_link: Literal["on", "off"] = Field(
        "on",
        description="on: the front places requests on a replica over its own TCP line (the "
        "cluster's secret proves it); off: by Serve calls",
    )

    # the chat product
    history: str = Field("sqlite", description="sqlite, memory or redis://host:port/db")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Conversations, feedback, session secret"
    )
    session_secret: str | None = Field(None, description="Signs cookies; default: in data_dir")
    system_prompt: str | None = Field(None, description="Put first in every chat's prompt")
    history_ttl: int | None = Field(
        None, ge=1, description="Seconds a conversation may sit unwritten, then it is removed"
    )

    def __init__(self, **values: Any) -> None:
        """A renamed setting's old name still counts, below its new one: keyword (flag) new, then
        keyword old, then CHATQUEUE_<NEW>, then CHATQUEUE_<OLD>, then the default."""
        environ = {k.upper(): v for k, v in os.environ.items()}
        for old, new in RENAMED.items():
            if old in values:
                _warn_renamed(old, new)
                values.setdefault(new, values.pop(old))
            if f"CHATQUEUE_{old.upper()}" in environ:
                _warn_renamed(old, new)
                if f"CHATQUEUE_{new.upper()}" not in environ:
                    values.setdefault(new, environ[f"CHATQUEUE_{old.upper()}"])
        super().__init__(**values)

    @field_validator("history")
    @classmethod
    def _history_store(cls, v: str) -> str:
        if v in ("sqlite", "memory") or v.startswith(("redis://", "rediss://", "unix://")):
            return v
        raise ValueError("expected sqlite, memory or a redis:// URL")

    @field_validator("kv_cache_memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None:
            parse_memory(v)  # raises ValueError with what is wrong
        return v

    @field_validator("prefill_stall_limit")
    @classmethod
    def _stall_limit(cls, v: float) -> float:
        if v != 0 and v <= 1:
            raise ValueError("expected 0 (off) or more than 1 (decode steps)")
        return v

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
            raise ValueError("--model goes with --engine hf or llamacpp, not the mock engine")
        if (
            self.engine == "llamacpp"
            and self.model is not None
            and not self.model.endswith(".gguf")
        ):
            raise ValueError("--engine llamacpp reads a GGUF file: --model must name a .gguf")
        if self.replicas is not None and (self.min_replicas or self.max_replicas):
            raise ValueError("--replicas or --min-replicas/--max-replicas, not both")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if self.min_replicas and self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError("--min-replicas is more than --max-replicas")
        if self.api_servers > 1 and self.is_cluster:
            raise ValueError("--api-servers is for one server; a cluster has its own front")
        if self.api_servers > 1 and self.history == "memory":
            raise ValueError(
                "--api-servers shares conversations between processes: --history sqlite or redis"
            )
        return self

    @property
    def is_cluster(self) -> bool:
        """Served by replicas on Ray Serve (chatqueue.cluster) rather than one process."""
        return bool(self.replicas or self.max_replicas or self.ray_address)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int | float:
    """`4GiB`, `512MiB`, `1.5GB`, `1e9` -> bytes (int); `0.3` (at most 1) -> that fraction of
    the free memory (float)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?I?B)?\s*", text.upper())
    try:
        number = float(match.group(1)) if match else -1.0
    except ValueError:
        number = -1.0
    if match is None or number <= 0:
        raise ValueError(f"expected bytes (4GiB, 512MiB, 1e9) or a fraction (0.3), not {text!r}")
    unit = match.group(2) or ""
    if not unit and number <= 1:
        return number
    return int(number * _UNITS[unit])


def _warn_renamed(old: str, new: str) -> None:
    def names(name: str) -> str:
        return f"{name} (--{name.replace('_', '-')}, CHATQUEUE_{name.upper()})"

    warnings.warn(f"{names(old)} is deprecated; use {names(new)}", DeprecationWarning, stacklevel=3)
