"""Engine configuration (a frozen dataclass) and byte sizes (`parse_bytes`).

Device and dtype defaults resolve here (`resolved_device`, `resolved_dtype`); the KV budget's
default (a share of free GPU memory, or 1 GiB on the CPU) and the context length are resolved
by `EngineCore`, which knows the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: str | int) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {value!r} (examples: 2GiB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class EngineConfig:
    model: str = "SmolLM2-135M-Instruct"
    policy: str = "logquant"
    fp_budget: int = 192
    group_size: int = 32
    sink_tokens: int | None = None  # first tokens kept at full precision for good; None: 4 for kivi, 0 otherwise
    key_fp_channels: int = 0  # key channels of widest range kept at 16 bits in every 2-bit block
    kv_bits: int = 2  # code width of demoted blocks: 2, 4 or 8
    kv_cache_memory: int | None = None  # bytes; None: gpu_memory_utilization on CUDA, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    debug_integrity: bool = False  # check the KV manager's invariants after every step
    decode_backend: str = "auto"  # decode attention: auto, torch, cpu (fused C++), triton (fused CUDA)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {self.dtype!r}")
        return names[self.dtype]
