"""Position-agnostic attention over a set of cached (key, value) pairs plus a new chunk.

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
