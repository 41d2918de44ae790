"""Server settings: one pydantic-settings object, from CLI flags and `LOGQUANT_*` env vars."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig, parse_bytes


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LOGQUANT_", cli_kebab_case=True, cli_prog_name="logquant-serve", cli_implicit_flags=True
    )

    model: str = Field("SmolLM2-135M-Instruct", description="default model name, local HF directory, .gguf file")
    served_model_name: str | None = Field(None, description="model id in the API (default: --model)")
    policy: Literal["fp16", "kivi", "logquant"] = Field("logquant", description="KV cache token policy")
    fp_budget: int = Field(192, ge=1, description="full-precision tokens per sequence (LogQuant W = B // 3)")
    group_size: int = Field(32, ge=1, description="value quantization group (channels)")
    kv_cache_memory: str | None = Field(None, description="KV budget, e.g. 2GiB (default: 1GiB CPU)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory fraction when no budget")
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: cuda if available")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: bf16 cuda, fp32 cpu")
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one batch")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one step")
    max_model_len: int | None = Field(None, ge=2, description="default: the model's context length")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1")
    max_waiting_requests: int = Field(256, ge=1, description="429 beyond this many queued sequences")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="413 beyond this request size")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="drain time on SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = Field(False, description="include prompt text in request logs")
    generation_config: str = Field(
        "auto", description="sampling defaults: 'auto' (the model's generation_config), 'vllm' (none), or a folder"
    )

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_bytes(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)
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
            kv_cache_memory=parse_bytes(self.kv_cache_memory) if self.kv_cache_memory else None,
            gpu_memory_utilization=self.gpu_memory_utilization,
            device=self.device,
            dtype=self.dtype,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
