"""StepTensors: a `StepPlan` turned into index tensors once per step: per KV group, a
`GroupTensors` shared by every layer of the group.

Sequences are attended in buckets (decodes in one, prefill chunks in another). For a bucket
of S sequences, each layer builds two padded key/value tensors straight from the store:

    kv_fp     [S, L_fp,     2, kv_heads, dim]  row s: its cached fp tokens, then its new tokens
    kv_packed [S, L_packed, 2, kv_heads, dim]  row s: its packed 2-bit pages, dequantized
                                               (L_packed = pages * bt)

and attends both parts with one call each, merged by log-sum-exp. In a window group (W
positions) the cached tokens are the newest W - 1 in position order, so row j of `kv_fp` is
position start - L_cached + j and the mask is a band: query t sees rows j with
L_cached + t - W < j <= L_cached + t. A decode sees all its rows, so the fused kernels read a
window group's `DecodeIndex` unchanged. Block sources and new-token
writes are rows of `kv_fp` flattened to `[S * L_fp]`, so a new token is read from the step's
own tensors and every write happens after attention. The CSR lists of the plan (`query_ptr`,
`fp_ptr`, `fp_slots`, `packed_ptr`, `packed_pages`) are what a fused kernel reads instead: with
`decode_index=True`, the decode bucket is a `DecodeIndex` (those lists as tensors, and write
sources that do not need `kv_fp`; no padded tensor is built), which the fused kernels of
`logquant/kernels/` read (C++ on the CPU, Triton on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from logquant.plan import GroupPlan, StepPlan

Mover = Callable[[torch.Tensor], torch.Tensor]
# The CPU kernel splits a sequence's keys into ceil(keys / SPLIT_KEYS) work items (at most
# MAX_SPLITS), so one long sequence still uses every core. The split depends on the keys only,
# never on the thread count: outputs are the same with any number of threads.
SPLIT_KEYS = 256
MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeIndex:
    """A decode bucket (one new token per sequence) as the fused kernels read it: CSR over
    token-level fp slots and 2-bit pages, read in place. Its writes read a compact tensor:
    rows `[0, n_src)` are the cached fp tokens demoted in this step (`src_fp_rows`), then the
    bucket's new tokens in sequence order (`new_src`)."""

    query_rows: torch.Tensor  # [S] int32 row of each sequence's new token in the flat batch
    fp_ptr: torch.Tensor  # [S + 1] int32 CSR offsets into fp_slots
    fp_slots: torch.Tensor  # [n_fp] int32 flat fp slots (page * fp_page_tokens + offset)
    packed_ptr: torch.Tensor  # [S + 1] int32 CSR offsets into packed_pages
    packed_pages: torch.Tensor  # [n_packed] int32 2-bit pages
    max_keys: int  # most keys one sequence attends to (cached fp + 2-bit + new): sizes the splits
    item_ptr: torch.Tensor  # [S + 1] int32 CPU kernel work items (splits of the keys) per sequence
    new_src: torch.Tensor  # [S] int64 the same rows as query_rows
    src_fp_rows: torch.Tensor  # [n_src] rows of the store's fp row view
    block_pages: torch.Tensor  # [num_blocks] pages the step's demoted blocks go to
    block_sources: torch.Tensor  # [num_blocks, bt] rows of the compact tensor
    write_pages: torch.Tensor  # [num_written] fp pages of the new tokens that stay fp
    write_offsets: torch.Tensor  # [num_written]
    write_sources: torch.Tensor  # [num_written] rows of the compact tensor
    write_slots: torch.Tensor  # [num_written] int32 their flat fp slots
    write_rows: torch.Tensor  # [num_written] int32 their rows of the flat batch


@dataclass(frozen=True)
class Bucket:
    query_rows: torch.Tensor  # [S, Q] rows of the flat batch (padding repeats the last row)
    out_rows: torch.Tensor  # [num_valid] rows of the flat batch this bucket computes
    out_sources: torch.Tensor  # [num_valid] matching rows of the flattened [S * Q] output
    fp_rows: torch.Tensor  # [S, L_fp] rows of the store's fp row view (padding: the zero page)
    new_dest: torch.Tensor  # [num_new] rows of kv_fp [S * L_fp] that take the new tokens
    new_src: torch.Tensor  # [num_new] their rows of the flat batch
    fp_mask: torch.Tensor  # [S, Q, L_fp] additive: 0 where the query sees the key, -inf elsewhere
    packed_pages: torch.Tensor  # [S, P] 2-bit pages (padding: the zero page); P == 0 when none
    packed_mask: torch.Tensor  # [S, 1, P * bt] additive
    has_packed: torch.Tensor  # [S] bool: the sequence has 2-bit tokens
    block_pages: torch.Tensor  # [num_blocks] pages the step's demoted blocks go to
    block_sources: torch.Tensor  # [num_blocks, bt] rows of kv_fp [S * L_fp]
    write_pages: torch.Tensor  # [num_written] fp pages of the new tokens that stay fp
    write_offsets: torch.Tensor  # [num_written]
    write_sources: torch.Tensor  # [num_written] rows of kv_fp [S * L_fp]


@dataclass(frozen=True)
class GroupTensors:
    plan: GroupPlan
    buckets: list[Bucket | DecodeIndex]  # a DecodeIndex: the decode bucket on a fused kernel
    bucket_of_seq: list[tuple[int, int]]  # per sequence of the plan: (bucket, row in bucket)


@dataclass(frozen=True)
class StepTensors:
    plan: StepPlan
    groups: list[GroupTensors]  # in `layout.groups` order


def build_step_tensors(
    plan: GroupPlan,
    block_tokens: int,
    fp_page_tokens: int,
    fp_row_strides: tuple[int, int],
    zero_page: int,
    dtype: torch.dtype,
    device: torch.device,
    decode_index: bool = False,
    window: int | None = None,
) -> GroupTensors:
    """Index tensors of one group's step, made on the CPU and moved once (pinned and async on
    CUDA). `fp_row_strides`: (rows per page, rows per token) of the store's fp row view; padding
    reads `zero_page`, which is never written, so masked keys and values are zeros, never NaN.
    `decode_index`: the decode bucket is a `DecodeIndex` (for a fused kernel) instead of a
    padded `Bucket`. `window`: the group's sliding window (None: full attention)."""
    query_lens = [plan.query_ptr[i + 1] - plan.query_ptr[i] for i in range(plan.num_seqs)]
    groups = [[i for i, n in enumerate(query_lens) if n == 1], [i for i, n in enumerate(query_lens) if n > 1]]
    groups = [g for g in groups if g]
    indexing = _Indexing(block_tokens, fp_page_tokens, fp_row_strides, zero_page, dtype, _mover(device), window)
    bucket_of_seq = [(0, 0)] * plan.num_seqs
    for b, seqs in enumerate(groups):
        for row, i in enumerate(seqs):
            bucket_of_seq[i] = (b, row)
    fused = decode_index and bool(groups) and query_lens[groups[0][0]] == 1
    buckets: list[Bucket | DecodeIndex] = [
        _decode_index(plan, seqs, indexing) if fused and b == 0 else _bucket(plan, seqs, indexing)
        for b, seqs in enumerate(groups)
    ]
    return GroupTensors(plan, buckets, bucket_of_seq)


@dataclass(frozen=True)
class _Indexing:
    """What turning one group's plan into index tensors needs: its page geometry, the store's
    zero page and fp row strides (rows per page, rows per token), the mask dtype, the device."""

    block_tokens: int
    fp_page_tokens: int
    fp_row_strides: tuple[int, int]
    zero_page: int
    dtype: torch.dtype
    to_device: Mover
    window: int | None

    def fp_row(self, slots: torch.Tensor) -> torch.Tensor:
        per_page, per_token = self.fp_row_strides
        return slots // self.fp_page_tokens * per_page + slots % self.fp_page_tokens * per_token


def _mover(device: torch.device) -> Mover:
    if device.type != "cuda":
        return lambda t: t.to(device)
    return lambda t: t.pin_memory().to(device, non_blocking=True)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _bucket(plan: GroupPlan, seqs: list[int], indexing: _Indexing) -> Bucket:
    ptr = {
        name: [getattr(plan, name)[i : i + 2] for i in seqs]
        for name in ("query_ptr", "fp_ptr", "packed_ptr", "block_ptr", "write_ptr")
    }
    new_len = torch.tensor([b - a for a, b in ptr["query_ptr"]])
    fp_len = torch.tensor([b - a for a, b in ptr["fp_ptr"]])
    width = int((fp_len + new_len).max())  # L_fp
    fp_slots = _padded(plan.fp_slots, ptr["fp_ptr"], width, pad=indexing.zero_page * indexing.fp_page_tokens)
    fp_rows = indexing.fp_row(fp_slots)
    row_base = [s * width for s in range(len(seqs))]  # first kv_fp row of each sequence
    t = torch.arange(int(new_len.max())).unsqueeze(0)  # [1, Q]
    t_clamped = torch.minimum(t, new_len.unsqueeze(1) - 1)  # [S, Q]
    is_new = t < new_len.unsqueeze(1)
    j = torch.arange(width).view(1, 1, -1)
    last = (fp_len.unsqueeze(1) + t_clamped).unsqueeze(2)  # [S, Q, 1]: the query's own row
    visible = j <= last  # [S, Q, L_fp]: causal over new tokens
    if indexing.window is not None:
        visible &= j > last - indexing.window  # the window's band (cached rows are in position order)
    query_rows = torch.tensor([a for a, _ in ptr["query_ptr"]]).unsqueeze(1) + t_clamped
    valid = is_new.flatten()
    packed_pages, packed_mask, has_packed = _packed_part(plan, ptr["packed_ptr"], indexing)
    blocks = _rows(ptr["block_ptr"], plan.block_sources, indexing.block_tokens, row_base)
    writes = _rows(ptr["write_ptr"], plan.write_sources, 1, row_base)
    write_slots = torch.tensor([s for a, b in ptr["write_ptr"] for s in plan.write_slots[a:b]], dtype=torch.long)
    block_pages = [p for a, b in ptr["block_ptr"] for p in plan.block_pages[a:b]]
    move = indexing.to_device
    return Bucket(
        query_rows=move(query_rows),
        out_rows=move(query_rows.flatten()[valid]),
        out_sources=move(torch.nonzero(valid).flatten()),
        fp_rows=move(fp_rows),
        new_dest=move((torch.tensor(row_base).unsqueeze(1) + fp_len.unsqueeze(1) + t).flatten()[valid]),
        new_src=move(query_rows.flatten()[valid]),
        fp_mask=move(_additive(visible, indexing.dtype)),
        packed_pages=move(packed_pages),
        packed_mask=move(packed_mask),
        has_packed=move(has_packed),
        block_pages=move(torch.tensor(block_pages, dtype=torch.long)),
        block_sources=move(blocks.view(-1, max(indexing.block_tokens, 1))),
        write_pages=move(write_slots // indexing.fp_page_tokens),
        write_offsets=move(write_slots % indexing.fp_page_tokens),
        write_sources=move(writes),
    )


def _packed_part(plan: GroupPlan, packed_ptr: list[list[int]], indexing: _Indexing) -> tuple[torch.Tensor, ...]:
    """Padded 2-bit pages of a bucket: (pages [S, P], additive mask [S, 1, P * bt], has_packed [S])."""
    counts = torch.tensor([b - a for a, b in packed_ptr])
    width = int(counts.max())
    pages = _padded(plan.packed_pages, packed_ptr, width, pad=indexing.zero_page)
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)  # [S, P]
    visible = valid.repeat_interleave(indexing.block_tokens, dim=1)  # [S, P * bt]
    return pages, _additive(visible.unsqueeze(1), indexing.dtype), counts > 0


def _padded(values: list[int], ptr: list[list[int]], width: int, pad: int) -> torch.Tensor:
    """values[a:b] of each (a, b) in `ptr` as the rows of a `[len(ptr), width]` tensor."""
    out = [pad] * (len(ptr) * width)
    for s, (a, b) in enumerate(ptr):
        out[s * width : s * width + b - a] = values[a:b]
    return torch.tensor(out, dtype=torch.long).view(len(ptr), width)


def _rows(ptr: list[list[int]], local_rows: list[int], per_item: int, row_base: list[int]) -> torch.Tensor:
    """Sequence-local rows (cached fp, then new) of each sequence's items -> rows of kv_fp."""
    out = [row_base[s] + r for s, (a, b) in enumerate(ptr) for r in local_rows[a * per_item : b * per_item]]
    return torch.tensor(out, dtype=torch.long)


def _decode_index(plan: GroupPlan, seqs: list[int], indexing: _Indexing) -> DecodeIndex:
    """CSR tensors of a decode bucket, its CPU work items and its writes (compact rows)."""
    fp_ptr, packed_ptr, item_ptr, fp_slots, packed_pages, src_slots = [0], [0], [0], [], [], []
    block_rows, write_rows = [], []  # >= 0: a cached token's compact row; < 0: ~(its new token's index)
    block_pages, write_slots, write_batch_rows = [], [], []
    bt, max_keys = indexing.block_tokens, 0
    for b, i in enumerate(seqs):  # sequence b's new token is the bucket's b-th (one per sequence)
        slots = plan.fp_slots[plan.fp_ptr[i] : plan.fp_ptr[i + 1]]
        fp_slots += slots
        packed_pages += plan.packed_pages[plan.packed_ptr[i] : plan.packed_ptr[i + 1]]
        fp_ptr.append(len(fp_slots))
        packed_ptr.append(len(packed_pages))
        keys = len(slots) + (packed_ptr[-1] - packed_ptr[-2]) * bt + 1
        max_keys = max(max_keys, keys)
        item_ptr.append(item_ptr[-1] + min(MAX_SPLITS, -(-keys // SPLIT_KEYS)))
        for r in plan.block_sources[plan.block_ptr[i] * bt : plan.block_ptr[i + 1] * bt]:
            block_rows.append(len(src_slots) if r < len(slots) else ~b)
            src_slots += slots[r : r + 1] if r < len(slots) else []
        block_pages += plan.block_pages[plan.block_ptr[i] : plan.block_ptr[i + 1]]
        write_slots += plan.write_slots[plan.write_ptr[i] : plan.write_ptr[i + 1]]
        write_rows += [~b for _ in plan.write_sources[plan.write_ptr[i] : plan.write_ptr[i + 1]]]
        write_batch_rows += [plan.query_ptr[i] for _ in plan.write_sources[plan.write_ptr[i] : plan.write_ptr[i + 1]]]
    move, rows = indexing.to_device, [plan.query_ptr[i] for i in seqs]
    write_at = torch.tensor(write_slots, dtype=torch.long)
    return DecodeIndex(
        query_rows=move(torch.tensor(rows, dtype=torch.int32)),
        fp_ptr=move(torch.tensor(fp_ptr, dtype=torch.int32)),
        fp_slots=move(torch.tensor(fp_slots, dtype=torch.int32)),
        packed_ptr=move(torch.tensor(packed_ptr, dtype=torch.int32)),
        packed_pages=move(torch.tensor(packed_pages, dtype=torch.int32)),
        max_keys=max_keys,
        item_ptr=move(torch.tensor(item_ptr, dtype=torch.int32)),
        new_src=move(torch.tensor(rows, dtype=torch.long)),
        src_fp_rows=move(indexing.fp_row(torch.tensor(src_slots, dtype=torch.long))),
        block_pages=move(torch.tensor(block_pages, dtype=torch.long)),
        block_sources=move(_compact(block_rows, len(src_slots)).view(-1, max(bt, 1))),
        write_pages=move(write_at // indexing.fp_page_tokens),
        write_offsets=move(write_at % indexing.fp_page_tokens),
        write_sources=move(_compact(write_rows, len(src_slots))),
        write_slots=move(write_at.to(torch.int32)),
        write_rows=move(torch.tensor(write_batch_rows, dtype=torch.int32)),
    )


def _compact(rows: list[int], num_cached: int) -> torch.Tensor:
    """Rows of the compact tensor: cached rows as they are, ~k (new token k) -> num_cached + k."""
    return torch.tensor([r if r >= 0 else num_cached + ~r for r in rows], dtype=torch.long)
