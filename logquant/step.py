"""StepTensors: a `StepPlan` turned into index tensors once per step, shared by every layer.

Each layer builds a pool of key/value rows for the whole step,

    pool = cat(2-bit tokens of the cached pages (q_pages order, block_tokens rows each),
               cached fp tokens (fp_slots order),
               new tokens (flat batch order))                      # [pool_rows, kv_heads, dim]

and attention reads it through `AttentionBucket`s: sequences with one new token (decodes) in
one bucket, sequences with a prefill chunk in another, each padded to `[S, L]` key rows with a
mask. The CSR tensors (`query_ptr`, `fp_ptr`, `fp_slots`, `q_ptr`, `q_pages`) are what a fused
kernel reads instead of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logquant.kv_manager import StepPlan


@dataclass(frozen=True)
class AttentionBucket:
    """Sequences attended together: query rows `[S, Q]`, key rows `[S, L]`, mask `[S, Q, L]`."""

    query_rows: torch.Tensor  # [S, Q] rows of the flat batch (padding repeats the last row)
    key_rows: torch.Tensor  # [S, L] rows of the pool (padding points at row 0 and is masked)
    mask: torch.Tensor  # [S, Q, L] bool, True where the query sees the key
    out_rows: torch.Tensor  # [num_valid] rows of the flat batch that this bucket computes
    out_sources: torch.Tensor  # [num_valid] matching rows of the flattened [S * Q] output


@dataclass(frozen=True)
class StepTensors:
    plan: StepPlan
    num_q_rows: int  # 2-bit rows at the start of the pool
    num_fp_cached: int
    q_pages: torch.Tensor  # [num_q_pages]
    fp_rows: torch.Tensor  # [num_fp_cached] row of each cached fp token in the store's fp row view
    buckets: list[AttentionBucket]
    block_pages: torch.Tensor  # [num_blocks]
    block_sources: torch.Tensor  # [num_blocks, block_tokens] rows of the fp part of the pool
    write_pages: torch.Tensor  # [num_written]
    write_offsets: torch.Tensor  # [num_written]
    write_sources: torch.Tensor  # [num_written] rows of the fp part of the pool


def build_step_tensors(
    plan: StepPlan, block_tokens: int, fp_page_tokens: int, fp_row_of: tuple[int, int], device: torch.device
) -> StepTensors:
    """Index tensors of a step (made on the CPU, moved once; pinned and async on CUDA).
    `fp_row_of`: (rows per page, rows per token) of the store's fp row view."""
    to_device = _mover(device)
    fp_slots = torch.tensor(plan.fp_slots, dtype=torch.long)
    rows_per_page, rows_per_token = fp_row_of
    write_slots = torch.tensor(plan.write_slots, dtype=torch.long)
    num_q_rows = len(plan.q_pages) * block_tokens
    return StepTensors(
        plan=plan,
        num_q_rows=num_q_rows,
        num_fp_cached=len(plan.fp_slots),
        q_pages=to_device(torch.tensor(plan.q_pages, dtype=torch.long)),
        fp_rows=to_device(fp_slots // fp_page_tokens * rows_per_page + fp_slots % fp_page_tokens * rows_per_token),
        buckets=[to_bucket(b, to_device) for b in _buckets(plan, block_tokens, num_q_rows)],
        block_pages=to_device(torch.tensor(plan.block_pages, dtype=torch.long)),
        block_sources=to_device(torch.tensor(plan.block_sources, dtype=torch.long).view(-1, max(block_tokens, 1))),
        write_pages=to_device(write_slots // fp_page_tokens),
        write_offsets=to_device(write_slots % fp_page_tokens),
        write_sources=to_device(torch.tensor(plan.write_sources, dtype=torch.long)),
    )


def _mover(device: torch.device):
    if device.type != "cuda":
        return lambda t: t.to(device)
    return lambda t: t.pin_memory().to(device, non_blocking=True)


def to_bucket(bucket: AttentionBucket, to_device) -> AttentionBucket:
    return AttentionBucket(*(to_device(t) for t in vars(bucket).values()))


def _buckets(plan: StepPlan, block_tokens: int, num_q_rows: int) -> list[AttentionBucket]:
    q_lens = [plan.query_ptr[i + 1] - plan.query_ptr[i] for i in range(plan.num_seqs)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    prefills = [i for i, n in enumerate(q_lens) if n > 1]
    return [_bucket(plan, seqs, block_tokens, num_q_rows) for seqs in (decodes, prefills) if seqs]


def _bucket(plan: StepPlan, seqs: list[int], block_tokens: int, num_q_rows: int) -> AttentionBucket:
    """Padded key and query indices for `seqs`; keys per sequence: 2-bit, cached fp, new."""
    idx = torch.tensor(seqs, dtype=torch.long)

    def ptr(values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(values, dtype=torch.long)
        return t[idx], t[idx + 1] - t[idx]  # start, length

    q_start, q_len = ptr(plan.q_ptr)
    fp_start, fp_len = ptr(plan.fp_ptr)
    new_start, new_len = ptr(plan.query_ptr)
    q_start, q_len = q_start * block_tokens, q_len * block_tokens
    fp_start = fp_start + num_q_rows
    new_rows = new_start + num_q_rows + len(plan.fp_slots)
    cached = (q_len + fp_len).unsqueeze(1)  # [S, 1]
    total = cached + new_len.unsqueeze(1)
    j = torch.arange(int(total.max())).unsqueeze(0)  # [1, L]
    key_rows = torch.where(
        j < q_len.unsqueeze(1),
        q_start.unsqueeze(1) + j,
        torch.where(j < cached, fp_start.unsqueeze(1) + j - q_len.unsqueeze(1), new_rows.unsqueeze(1) + j - cached),
    )
    key_rows = torch.where(j < total, key_rows, 0)
    t = torch.arange(int(new_len.max())).unsqueeze(0)  # [1, Q]
    t_clamped = torch.minimum(t, new_len.unsqueeze(1) - 1)  # [S, Q]
    mask = j.unsqueeze(0) <= (cached + t_clamped).unsqueeze(2)  # [S, Q, L]: causal over the new tokens
    valid = (t < new_len.unsqueeze(1)).flatten()
    query_rows = new_start.unsqueeze(1) + t_clamped
    return AttentionBucket(
        query_rows=query_rows,
        key_rows=key_rows,
        mask=mask,
        out_rows=query_rows.flatten()[valid],
        out_sources=torch.nonzero(valid).flatten(),
    )
