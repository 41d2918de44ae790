"""Position-agnostic attention over a set of cached (key, value) pairs plus a new chunk.

`attend` (one sequence) is the test oracle; `bucket_attention` is the batched CPU path.

Keys are stored after RoPE, so attention for one sequence is a softmax over a *set*: the
order of cached tokens does not matter. The new chunk's `q_len` tokens come last in `keys`
and are causal among themselves; every cached token is visible to every query.
"""

from __future__ import annotations

import torch


def attend(
    query: torch.Tensor,  # [q_len, num_heads, head_dim]
    keys: torch.Tensor,  # [num_cached + q_len, num_kv_heads, head_dim]
    values: torch.Tensor,  # [num_cached + q_len, num_kv_heads, head_dim]
    scaling: float,
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    """Reference attention (GQA) with a causal mask on the trailing chunk; softmax in float32."""
    q_len, num_heads, head_dim = query.shape
    num_keys, num_kv_heads, _ = keys.shape
    if num_keys < q_len or num_heads % num_kv_heads != 0:
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, keys {tuple(keys.shape)}")
    group = num_heads // num_kv_heads
    q = query.float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kvh, g, q, d]
    k = keys.float().permute(1, 2, 0)  # [kvh, d, k]
    v = values.float().permute(1, 0, 2)  # [kvh, k, d]
    scores = torch.matmul(q, k.unsqueeze(1)) * scaling  # [kvh, g, q, k]
    if q_len > 1:
        scores = scores + causal_tail_mask(q_len, num_keys, scores.device)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.unsqueeze(1))  # [kvh, g, q, d]
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(query.dtype)


def causal_tail_mask(q_len: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Additive mask [q_len, num_keys]: query i sees all cached keys and new keys 0..i."""
    num_cached = num_keys - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0) - num_cached
    return torch.where(cols <= rows, 0.0, float("-inf"))


def bucket_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], the step's flat batch
    pool: torch.Tensor,  # [pool_rows, 2, kv_heads, head_dim] keys and values of the step
    buckets: list,  # list[logquant.step.AttentionBucket]
    scaling: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Batched attention of a whole step: one SDPA call per bucket. GQA is folded into the
    query rows (each KV head's group of query heads is a block of rows), so K/V are never
    repeated."""
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = pool.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(query)
    flat_pool = pool.view(pool.shape[0], -1)
    for bucket in buckets:
        s, q_len = bucket.query_rows.shape
        q = query[bucket.query_rows].view(s, q_len, kv_heads, group, head_dim)
        q = q.permute(0, 2, 1, 3, 4).reshape(s, kv_heads, q_len * group, head_dim)  # rows: (token, head)
        kv = flat_pool.index_select(0, bucket.key_rows.flatten()).view(s, -1, 2, kv_heads, head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [s, kv_heads, L, d]
        mask = bucket.mask if group == 1 or q_len == 1 else bucket.mask.repeat_interleave(group, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.unsqueeze(1), scale=scaling)
        o = o.view(s, kv_heads, q_len, group, head_dim).permute(0, 2, 1, 3, 4).reshape(s * q_len, num_heads, head_dim)
        out[bucket.out_rows] = o[bucket.out_sources]
    return out
