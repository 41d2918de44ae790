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
    kv_fp: torch.Tensor,  # [S, L_fp, 2, kv_heads, head_dim] cached fp tokens, then new tokens
    kv_packed: tuple[torch.Tensor, torch.Tensor]
    | None,  # keys, values [S, L_packed, kv_heads, head_dim] (2-bit, dequantized)
    bucket,  # logquant.step.Bucket
    scaling: float,
    softcap: float | None = None,  # logits -> tanh(logits / softcap) * softcap (Gemma 2)
    sinks: torch.Tensor | None = None,  # [num_heads] learned sink logits (gpt-oss)
) -> torch.Tensor:  # [len(bucket.out_rows), num_heads, head_dim]
    """Attention of one bucket of sequences: one call over the fp part and one over the 2-bit
    part, merged by their log-sum-exp. GQA is folded into the query rows (a KV head's group of
    query heads is a block of rows), so K/V are never repeated. A sink logit s joins each
    head's softmax denominator only, which scales the output by sigmoid(lse - s)."""
    s, q_len = bucket.query_rows.shape
    num_heads, head_dim = query.shape[1:]
    kv_heads = kv_fp.shape[3]
    group = num_heads // kv_heads
    q = query[bucket.query_rows].view(s, q_len, kv_heads, group, head_dim)
    q = q.permute(0, 2, 1, 3, 4).reshape(s, kv_heads, q_len * group, head_dim)  # rows: (token, head)
    fp_mask = bucket.fp_mask if group == 1 or q_len == 1 else bucket.fp_mask.repeat_interleave(group, dim=1)
    k_fp, v_fp = kv_fp[:, :, 0], kv_fp[:, :, 1]
    out, lse = _attention_lse(
        q, k_fp, v_fp, fp_mask.unsqueeze(1), scaling, softcap
    )  # [s, kvh, rows, d], [s, kvh, rows]
    if kv_packed is not None:
        out_packed, lse_packed = _attention_lse(q, *kv_packed, bucket.packed_mask.unsqueeze(1), scaling, softcap)
        lse_packed = lse_packed.masked_fill(
            ~bucket.has_packed.view(s, 1, 1), float("-inf")
        )  # no 2-bit tokens: weight 0
        top = torch.maximum(lse, lse_packed)
        w_fp, w_packed = torch.exp(lse - top).unsqueeze(-1), torch.exp(lse_packed - top).unsqueeze(-1)
        out = (out * w_fp + out_packed * w_packed) / (w_fp + w_packed)
        lse = top + torch.log(w_fp + w_packed).squeeze(-1)
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, 1, group).expand(1, kv_heads, q_len, group).reshape(1, kv_heads, -1)
        out = out * torch.sigmoid(lse - sink).unsqueeze(-1)
    out = out.view(s, kv_heads, q_len, group, head_dim).permute(0, 2, 1, 3, 4).reshape(s * q_len, num_heads, head_dim)
    return out[bucket.out_sources].to(query.dtype)


def _attention_lse(
    q: torch.Tensor,  # [S, kv_heads, rows, d]
    keys: torch.Tensor,  # [S, L, kv_heads, d]
    values: torch.Tensor,  # [S, L, kv_heads, d]
    mask: torch.Tensor,  # [S, 1, rows or 1, L] additive
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # [S, kv_heads, rows, d] float32, [S, kv_heads, rows] float32
    """Softmax attention and its log-sum-exp (fully masked rows give 0 and any lse: the caller
    weighs them out). On the CPU, PyTorch's flash kernel returns both in one pass (it has no
    softcap: with one, the scores are computed here)."""
    k, v = keys.transpose(1, 2), values.transpose(1, 2)  # [S, kv_heads, L, d]
    mask = mask.expand(-1, -1, q.shape[2], -1)
    if q.device.type == "cpu" and softcap is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.to(q.dtype), v.to(q.dtype), 0.0, False, attn_mask=mask.to(q.dtype), scale=scaling
        )
        return out.float(), lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)
    return torch.matmul(probs, v.float()), lse
