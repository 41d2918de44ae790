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
from logquant.layout import KVGroup, KVLayout
from logquant.step import DecodeIndex

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
VECTOR_LANES = 8


def cpu_kernel_supports(layout: KVLayout | KVGroup, dtype: torch.dtype) -> str | None:
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


def page_layout_args(group: KVGroup) -> list[int]:
    """A KV group's page layout as the kernel's 13 integers: the page stride (the bytes of a
    page id: a layer's pages are that far apart), fp tokens per page, block tokens, value
    group size, byte offsets of the 2-bit sections, key outlier channels and their offsets."""
    sections = group.packed_sections() if group.block_tokens else {}
    names = ("key_codes", "value_codes", "key_scale", "key_zero", "value_scale", "value_zero")
    offsets = [sections[name][0] if sections else 0 for name in names]
    outliers = (
        [sections["key_outlier_values"][0], sections["key_outlier_channels"][0]] if group.key_fp_channels else [0, 0]
    )
    return [
        group.page_stride,
        group.fp_page_tokens,
        group.block_tokens,
        group.group_size,
        *offsets,
        group.key_fp_channels,
        *outliers,
    ]


@dataclass(frozen=True)
class CpuDecode:
    op: Callable[..., None]
    layout_args: list[int]
    dtype: torch.dtype  # the store's full-precision dtype

    @classmethod
    def for_layout(cls, group: KVGroup, dtype: torch.dtype) -> CpuDecode:
        """The kernel for the layers of one KV group. Raises ValueError if the kernel cannot
        read the layout, `KernelBuildError` if it cannot be built here."""
        reason = cpu_kernel_supports(group, dtype)
        if reason is not None:
            raise ValueError(reason)
        return cls(load_cpu_kernel(), page_layout_args(group), dtype)

    def __call__(
        self,
        layer_bytes: torch.Tensor,  # uint8, flat: the store's bytes from the layer's first byte on
        index: DecodeIndex,
        query: torch.Tensor,  # [num_tokens, heads, head_dim], the step's flat batch
        key: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        scaling: float,
        out: torch.Tensor,  # [num_tokens, heads, head_dim]: the bucket's rows are written
    ) -> None:
        query, key, value = (t.to(self.dtype) for t in (query, key, value))  # no-ops: the model runs in it
        target = out if out.dtype == self.dtype else torch.empty_like(query)
        self.op(
            query,
            key,
            value,
            index.query_rows,
            index.fp_ptr,
            index.fp_slots,
            index.packed_ptr,
            index.packed_pages,
            index.item_ptr,
            layer_bytes,
            target,
            self.layout_args,
            scaling,
        )
        if target is not out:
            out[index.new_src] = target[index.new_src].to(out.dtype)

    def write(self, layer_bytes: torch.Tensor, index: DecodeIndex, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the bucket's new tokens that stay full precision in their fp slots (after
        attention: a slot may still hold a token this step demoted)."""
        key, value = key.to(self.dtype), value.to(self.dtype)
        torch.ops.logquant_cpu.write_tokens(
            key, value, index.write_rows, index.write_slots, layer_bytes, self.layout_args
        )
