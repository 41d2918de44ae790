"""Which decode attention a store runs (no Triton import here).

`auto` (the default) picks the fused kernel of the device: `triton` on CUDA when Triton is
installed and reads the layout; `cpu` on the CPU when the C++ kernel builds here and agrees
with the torch path on a small case (`cpu_check.py`), else `torch` with one log line saying
why. An explicit `cpu` or `triton` that cannot run is a ValueError (a start-up error).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from logquant.layout import KVLayout

DECODE_BACKENDS = ("auto", "torch", "cpu", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger(__name__)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_supports(layout: KVLayout, dtype: torch.dtype) -> str | None:
    """Why the fused Triton kernel cannot read this layout, or None when it can."""
    if layout.bits != 2:
        return f"the kernel reads 2-bit codes, the layout has {layout.bits}-bit codes"
    if dtype not in KERNEL_DTYPES:
        return f"the kernel reads a {dtype} cache; it supports {KERNEL_DTYPES}"
    if layout.head_dim % 4 != 0:
        return f"head_dim {layout.head_dim} is not a multiple of 4"
    return None


def cpu_kernel_problem(layout: KVLayout, dtype: torch.dtype) -> str | None:
    """Why the fused CPU kernel cannot run this layout here (layout, build or self-check),
    or None when it can."""
    from logquant.kernels.cpu_check import check_cpu_kernel  # builds the kernel on first use

    return check_cpu_kernel(layout, dtype)


def select_decode_backend(
    device: torch.device, layout: KVLayout, dtype: torch.dtype, requested: str | None = None
) -> str:
    """`requested` if given and not `auto` (checked), else the device's fused kernel when it
    can run, else `torch`."""
    requested = requested or "auto"
    if requested not in DECODE_BACKENDS:
        raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got {requested!r}")
    if requested == "auto":
        return _auto(device, layout, dtype)
    if requested == "triton":
        if not triton_available():
            raise ValueError("decode backend 'triton' needs the triton package (pip install -e '.[gpu]')")
        reason = kernel_supports(layout, dtype)
        if reason is not None:
            raise ValueError(f"decode backend 'triton': {reason}")
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"decode backend 'cpu' runs on the CPU, the store is on {device}")
        reason = cpu_kernel_problem(layout, dtype)
        if reason is not None:
            raise ValueError(f"decode backend 'cpu': {reason}")
    return requested


def _auto(device: torch.device, layout: KVLayout, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        usable = triton_available() and kernel_supports(layout, dtype) is None
        return "triton" if usable else "torch"
    if device.type != "cpu":
        return "torch"
    reason = cpu_kernel_problem(layout, dtype)
    if reason is None:
        return "cpu"
    logger.warning("decode backend: torch (the fused CPU kernel cannot run: %s)", reason)
    return "torch"
