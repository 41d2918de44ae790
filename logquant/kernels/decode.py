"""Host side of the fused decode attention: store views, split count, the two launches.

Imports Triton (through `triton_decode`): import this module only where the kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from logquant.kernels.triton_decode import decode_partial_kernel, decode_reduce_kernel
from logquant.layout import KVGroup
from logquant.step import DecodeIndex

MIN_KEYS_PER_SPLIT = 256  # fewer keys than this per split: the reduction costs more than it saves
MAX_SPLITS = 32
BLOCK_N = 64  # fp tokens per tile
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class StoreLayer:
    """One layer of the store's byte buffer, viewed as the kernel reads it: flat from the
    layer's first byte, pages `layout.page_stride` bytes apart."""

    fp_tier: torch.Tensor  # the layer's bytes as the fp dtype (flat)
    codes: torch.Tensor  # the layer's bytes as uint8 (flat)
    scales: torch.Tensor  # the layer's bytes as float16 (flat): scale and zero sections
    layout: KVGroup

    @classmethod
    def of(cls, layer_bytes: torch.Tensor, dtype: torch.dtype, layout: KVGroup) -> StoreLayer:
        """`layer_bytes`: `PagedKVStore.layer_bytes(layer)`; `layout`: the layer's group."""
        element = torch.empty((), dtype=dtype).element_size()
        flat = layer_bytes[: layer_bytes.numel() // element * element]  # whole elements for the typed views
        return cls(flat.view(dtype), flat, flat[: flat.numel() // 2 * 2].view(torch.float16), layout)


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(num_seqs: int, kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Splits of the key set: enough programs to fill the GPU twice over, at least
    MIN_KEYS_PER_SPLIT keys per split, at most MAX_SPLITS. One on the CPU (interpreter)."""
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    by_occupancy = -(-target // (num_seqs * kv_heads))
    by_work = -(-max_keys // MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_work, MAX_SPLITS))


def _page_constants(layout: KVGroup, dtype: torch.dtype) -> dict[str, int]:
    """Byte layout of a page as the kernel's compile-time constants (offsets in the unit of
    the view that reads them: bytes for codes, float16 elements for scales and zeros)."""
    sections = layout.packed_sections()
    element, stride = torch.empty((), dtype=dtype).element_size(), layout.page_stride  # stride: bytes of a page id
    assert stride % element == 0 and all(offset % 2 == 0 for offset, _ in sections.values())
    return dict(
        BLOCK_TOKENS=layout.block_tokens,
        FP_PAGE_TOKENS=layout.fp_page_tokens,
        PAGE_BYTES=stride,
        PAGE_ELEMS=stride // element,
        PAGE_HALVES=stride // 2,
        KEY_CODES=sections["key_codes"][0],
        VALUE_CODES=sections["value_codes"][0],
        KEY_SCALE=sections["key_scale"][0] // 2,
        KEY_ZERO=sections["key_zero"][0] // 2,
        VALUE_SCALE=sections["value_scale"][0] // 2,
        VALUE_ZERO=sections["value_zero"][0] // 2,
        KEY_OUT=layout.key_fp_channels,
        KEY_OUT_VALUES=sections["key_outlier_values"][0] // 2 if layout.key_fp_channels else 0,
        KEY_OUT_CHANNELS=sections["key_outlier_channels"][0] if layout.key_fp_channels else 0,
    )


def decode_partials(
    store: StoreLayer,
    index: DecodeIndex,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    num_splits: int,
    block_n: int = BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per split: normalized output `[S, heads, splits, head_dim]` float32 and its log2-sum-exp
    `[S, heads, splits]` (-inf for a split that had no keys)."""
    layout, (num_seqs,), heads = store.layout, index.query_rows.shape, query.shape[1]
    kv_heads, head_dim = layout.num_kv_heads, layout.head_dim
    group = heads // kv_heads
    part_out = torch.empty(num_seqs, heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=query.device)
    dtype = store.fp_tier.dtype
    decode_partial_kernel[(num_seqs, kv_heads, num_splits)](
        query,
        key,
        value,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        index.query_rows,
        index.fp_ptr,
        index.fp_slots,
        index.packed_ptr,
        index.packed_pages,
        store.fp_tier,
        store.codes,
        store.scales,
        part_out,
        part_lse,
        num_splits,
        scaling,
        KV_HEADS=kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        GROUP_SIZE=layout.group_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        BLOCK_BT=max(16, triton.next_power_of_2(layout.block_tokens)),
        DOT_DTYPE=_TL_DTYPES[dtype],
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        **_page_constants(layout, dtype),
    )
    return part_out, part_lse


def decode_attention(
    store: StoreLayer,
    index: DecodeIndex,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> None:
    """Attention of a decode bucket: for each sequence, its query row of `query`
    `[num_tokens, heads, head_dim]` over its cached fp tokens, its 2-bit pages and its new
    token (the same row of `key`/`value`), written to that row of `out`. Two launches."""
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the kernel needs head_dim contiguous in query, key, value and out")
    num_seqs, heads, head_dim = index.query_rows.numel(), query.shape[1], store.layout.head_dim
    splits = num_splits or choose_splits(num_seqs, store.layout.num_kv_heads, index.max_keys, query.device)
    part_out, part_lse = decode_partials(store, index, query, key, value, scaling, splits, block_n or BLOCK_N)
    decode_reduce_kernel[(num_seqs, heads)](
        part_out,
        part_lse,
        out,
        index.query_rows,
        out.stride(0),
        out.stride(1),
        splits,
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
