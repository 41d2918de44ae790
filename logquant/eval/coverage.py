"""Attention coverage of the full-precision set (the paper's Figure 4).

One forward pass over real text with exact attention; for each sampled query position t (a
decode step with t cached tokens) and every layer and head, the share of attention mass that
falls on tokens the policy keeps in full precision at that length (plus the current token),
with token 0 (the attention sink every policy keeps) left out of both sums.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from logquant.eval.configs import CacheConfig


@torch.inference_mode()
def attention_maps(model: PreTrainedModel, ids: list[int]) -> list[torch.Tensor]:
    """Exact attention probabilities per layer: [heads, T, T] each (eager attention)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([ids], device=model.device), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [a[0].float() for a in out.attentions]


def fp_mask(config: CacheConfig, query_positions: list[int], length: int, group_size: int) -> torch.Tensor:
    """[queries, length] bool: keys in full precision for each query (token 0 excluded)."""
    mask = torch.zeros(len(query_positions), length, dtype=torch.bool)
    for row, t in enumerate(query_positions):
        if config.policy == "fp16":
            mask[row, : t + 1] = True
        else:
            mask[row, config.token_policy(group_size).full_precision_positions(t)] = True
            mask[row, t] = True
    mask[:, 0] = False
    return mask


def coverage(maps: list[torch.Tensor], config: CacheConfig, query_positions: list[int], group_size: int = 32) -> float:
    """Mean over layers, heads and queries of fp attention mass / all mass (token 0 excluded)."""
    length = maps[0].shape[-1]
    mask = fp_mask(config, query_positions, length, group_size).float()  # [Q, T]
    valid = torch.zeros_like(mask)
    for row, t in enumerate(query_positions):
        valid[row, 1 : t + 1] = 1.0
    rows = torch.tensor(query_positions)
    shares = []
    for attn in maps:  # [heads, T, T]
        picked = attn[:, rows, :]  # [heads, Q, T]
        covered = (picked * mask).sum(-1)
        total = (picked * valid).sum(-1).clamp_min(1e-12)
        shares.append((covered / total).mean())
    return float(torch.stack(shares).mean())
