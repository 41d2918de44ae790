"""Server settings: one pydantic-settings object, from CLI flags and `LOGQUANT_*` env vars.

Checks that need no model run here, so a bad flag stops the process before anything loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig, parse_bytes


class ServerSettings(BaseSettings):
    """
    OpenAI-compatible LLM server with a 2-bit LogQuant KV cache. Every flag can also be set by
    the environment variable shown with it (LOGQUANT_ and the flag's name); flags win.
    "null" means unset, and so does an empty variable (LOGQUANT_API_KEY=), as compose passes
    a blank .env entry.
    """

    model_config = SettingsConfigDict(
        env_prefix="LOGQUANT_",
        env_ignore_empty=True,  # the one rule: an empty LOGQUANT_* variable means unset
        cli_kebab_case=True,
        cli_prog_name="logquant-serve",
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
    )

    model: str = Field(
        "SmolLM2-135M-Instruct",
        description="embedded model (SmolLM2-135M-Instruct, gemma-3-270m), local HF directory, .gguf file",
    )
    served_model_name: str | None = Field(None, description="model id in the API; null: the --model value")
    policy: Literal["fp16", "kivi", "logquant"] = Field("logquant", description="KV cache token policy")
    fp_budget: int = Field(192, ge=1, description="full-precision tokens per sequence (LogQuant W = B // 3)")
    group_size: int = Field(32, ge=2, description="value quantization group (channels), a power of two")
    sink_tokens: int | None = Field(
        None,
        ge=0,
        description="first tokens of every sequence kept at full precision (attention sinks); "
        "null: 4 for kivi, 0 otherwise",
    )
    key_fp_channels: int = Field(
        0, ge=0, description="key channels of widest range kept at 16 bits in every 2-bit block (outliers)"
    )
    kv_bits: int = Field(2, description="code width of demoted blocks: 2, 4 or 8 (the CUDA kernel reads 2 only)")
    kv_cache_memory: str | None = Field(
        None, description="KV budget, e.g. 2GiB; null: 1GiB on CPU, a GPU memory fraction on CUDA"
    )
    decode_backend: Literal["auto", "torch", "cpu", "triton"] = Field(
        "auto",
        description="decode attention: auto (the device's fused kernel when it builds and passes its start-up check, "
        "else torch), torch (gather + dequantize + SDPA), cpu (fused C++ kernel), triton (fused CUDA kernel)",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory fraction when no budget")
    device: Literal["cpu", "cuda"] | None = Field(None, description="null: cuda if available, else cpu")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="null: bfloat16 on cuda, float32 on cpu"
    )
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one batch")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one step")
    max_model_len: int | None = Field(None, ge=2, description="null: the model's context length")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    limit_concurrency: int | None = Field(
        512, ge=1, description="uvicorn: 503 for requests beyond this many open connections and tasks; null: none"
    )
    timeout_keep_alive: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    timeout_request_header: float = Field(
        20.0, gt=0, description="seconds to send a request's headers, from connecting or from the previous response"
    )
    timeout_request_body: float = Field(60.0, gt=0, description="seconds to send a request's body (408 after)")
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every route but /health, /ready, /metrics, /version"
    )
    max_waiting_requests: int = Field(
        256, ge=1, description="429 beyond this many waiting sequences, counted from acceptance"
    )
    max_sequences_per_request: int = Field(
        64, ge=1, description="400 for a request of more sequences (prompts x n); at most --max-waiting-requests"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="413 beyond this request size")
    max_response_bytes: int = Field(
        32 * 2**20, ge=1024, description="400 for a non-streaming request whose response could be larger (an estimate)"
    )
    stream_buffer_tokens: int = Field(
        32, ge=1, description="tokens per sample generated ahead of a streaming client before its request pauses"
    )
    stream_stall_timeout: float = Field(
        60.0, gt=0, description="a stream paused this long (its client reads nothing) is aborted"
    )
    step_timeout: float = Field(
        120.0, gt=0, description="an engine step running longer, or a dead engine thread: 503s and exit 1"
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, requests still running after this long end with a 503"
    )
    debug_integrity: bool = Field(
        False, description="check the KV manager's invariants after every step (slow; for debugging)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = Field(False, description="include prompt text in request logs")
    max_log_len: int = Field(1000, ge=0, description="characters of a prompt or user field written to a log line")
    allowed_origins: list[str] = Field(
        default_factory=list, description="CORS: origins browsers may call from, e.g. https://app.example; [] is off"
    )
    generation_config: str = Field(
        "auto", description="sampling defaults: 'auto' (the model's generation_config), 'vllm' (none), or a folder"
    )

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_bytes(cls, value: str | None) -> str | None:
        if value is not None and parse_bytes(value) <= 0:
            raise ValueError("must be a positive size, e.g. 2GiB (leave it unset for the default)")
        return value

    @field_validator("kv_bits")
    @classmethod
    def _check_kv_bits(cls, value: int) -> int:
        if value not in (2, 4, 8):
            raise ValueError(f"must be 2, 4 or 8, not {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two that divides the model's head dim (e.g. 32), not {value}")
        return value

    @field_validator("model")
    @classmethod
    def _check_model_path(cls, value: str) -> str:
        """A path (not a hub id like org/name) must exist."""
        looks_like_path = value.startswith(("/", ".", "~")) or value.endswith(".gguf") or value.count("/") > 1
        if looks_like_path and not Path(value).expanduser().exists():
            raise ValueError(f"the path {value} does not exist")
        return value

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            policy=self.policy,
            fp_budget=self.fp_budget,
            group_size=self.group_size,
            sink_tokens=self.sink_tokens,
            key_fp_channels=self.key_fp_channels,
            kv_bits=self.kv_bits,
            kv_cache_memory=parse_bytes(self.kv_cache_memory) if self.kv_cache_memory else None,
            gpu_memory_utilization=self.gpu_memory_utilization,
            device=self.device,
            dtype=self.dtype,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            decode_backend=self.decode_backend,
            debug_integrity=self.debug_integrity,
        )
