"""Which decode attention a store runs (no Triton import here)."""

from __future__ import annotations

import importlib.util

import torch

from logquant.layout import KVLayout

DECODE_BACKENDS = ("torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_supports(layout: KVLayout, dtype: torch.dtype) -> str | None:
    """Why the fused kernel cannot read this layout, or None when it can."""
    if layout.bits != 2:
        return f"the kernel reads 2-bit codes, the layout has {layout.bits}-bit codes"
    if dtype not in KERNEL_DTYPES:
        return f"the kernel reads a {dtype} cache; it supports {KERNEL_DTYPES}"
    if layout.head_dim % 4 != 0:
        return f"head_dim {layout.head_dim} is not a multiple of 4"
    return None


def select_decode_backend(
    device: torch.device, layout: KVLayout, dtype: torch.dtype, requested: str | None = None
) -> str:
    """`requested` if given (checked), else `triton` on CUDA when it can run, else `torch`."""
    if requested is None:
        usable = device.type == "cuda" and triton_available() and kernel_supports(layout, dtype) is None
        return "triton" if usable else "torch"
    if requested not in DECODE_BACKENDS:
        raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got {requested!r}")
    if requested == "triton":
        if not triton_available():
            raise ValueError("decode backend 'triton' needs the triton package (pip install -e '.[gpu]')")
        reason = kernel_supports(layout, dtype)
        if reason is not None:
            raise ValueError(f"decode backend 'triton': {reason}")
    return requested
