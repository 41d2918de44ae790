"""Host side of the fused CPU decode attention (`csrc/decode_cpu.cpp`).

`CpuDecode.for_layout` checks that the kernel reads the layout, builds (or loads) it once and
holds the page layout as the kernel's integer arguments; `__call__` attends one layer of a
decode bucket, reading the store's bytes in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from logquant.kernels.cpu_build import load_cpu_kernel
from logquant.layout import KVLayout
from logquant.step import DecodeIndex

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
VECTOR_LANES = 8


def cpu_kernel_supports(layout: KVLayout, dtype: torch.dtype) -> str | None:
    """Why the CPU kernel cannot read this layout, or None when it can."""
    if layout.bits != 2:
        return f"the kernel reads 2-bit codes, the layout has {layout.bits}-bit codes"
    if dtype not in CPU_DTYPES:
        return f"the kernel reads a {dtype} cache; it supports {CPU_DTYPES}"
    if layout.head_dim % VECTOR_LANES or layout.head_dim > MAX_HEAD_DIM:
        return f"head_dim {layout.head_dim} is not a multiple of {VECTOR_LANES} up to {MAX_HEAD_DIM}"
    if layout.block_tokens and layout.group_size % VECTOR_LANES:
        return f"group_size {layout.group_size} is not a multiple of {VECTOR_LANES}"
    return None


def page_layout_args(layout: KVLayout) -> list[int]:
    """The page layout as the kernel's 13 integers (byte offsets of the 2-bit sections)."""
    sections = layout.q_sections() if layout.block_tokens else {}
    names = ("key_codes", "value_codes", "key_scale", "key_zero", "value_scale", "value_zero")
    offsets = [sections[name][0] if sections else 0 for name in names]
    outliers = [sections["key_outlier_values"][0], sections["key_outlier_channels"][0]] if layout.key_fp_channels else [0, 0]
    return [layout.page_bytes, layout.fp_page_tokens, layout.block_tokens, layout.group_size, *offsets,
            layout.key_fp_channels, *outliers]  # fmt: skip


@dataclass(frozen=True)
class CpuDecode:
    op: Callable[..., None]
    layout_args: list[int]
    dtype: torch.dtype  # the store's full-precision dtype

    @classmethod
    def for_layout(cls, layout: KVLayout, dtype: torch.dtype) -> CpuDecode:
        """Raises ValueError if the kernel cannot read the layout, `KernelBuildError` if it
        cannot be built here."""
        reason = cpu_kernel_supports(layout, dtype)
        if reason is not None:
            raise ValueError(reason)
        return cls(load_cpu_kernel(), page_layout_args(layout), dtype)

    def __call__(
        self,
        layer_bytes: torch.Tensor,  # [num_pages + 1, page_bytes] uint8, one layer of the store
        index: DecodeIndex,
        query: torch.Tensor,  # [num_tokens, heads, head_dim], the step's flat batch
        key: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        scaling: float,
        out: torch.Tensor,  # [num_tokens, heads, head_dim]: the bucket's rows are written
    ) -> None:
        query, key, value = (t.to(self.dtype) for t in (query, key, value))  # no-ops: the model runs in it
        target = out if out.dtype == self.dtype else torch.empty_like(query)
        self.op(query, key, value, index.query_rows, index.fp_ptr, index.fp_slots, index.q_ptr, index.q_pages,
                index.item_ptr, layer_bytes, target, self.layout_args, scaling)  # fmt: skip
        if target is not out:
            out[index.new_src] = target[index.new_src].to(out.dtype)

    def write(self, layer_bytes: torch.Tensor, index: DecodeIndex, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the bucket's new tokens that stay full precision in their fp slots (after
        attention: a slot may still hold a token this step demoted)."""
        key, value = key.to(self.dtype), value.to(self.dtype)
        torch.ops.logquant_cpu.write_tokens(key, value, index.write_rows, index.write_slots, layer_bytes, self.layout_args)
