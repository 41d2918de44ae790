"""Shared pieces of the evaluation tools: feeding a cache, per-column facts, tables, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Cache, PretrainedConfig, PreTrainedModel

from logquant.eval.configs import CacheConfig, kv_bytes, mean_fp_tokens, resolve

__all__ = ["CacheConfig", "column_facts", "feed", "print_table", "write_json"]


@torch.inference_mode()
def feed(model: PreTrainedModel, cache: Cache, ids: list[int]) -> torch.Tensor:
    """Run `ids` as one chunk through the cache; return the logits of its last token [vocab]."""
    device = model.device
    return model(input_ids=torch.tensor([ids], device=device), cache=cache, logits_to_keep=1).logits[0, -1].float()


def column_facts(config: CacheConfig, model_config: PretrainedConfig, lengths: list[int]) -> tuple[CacheConfig, dict]:
    """`config` with its budget resolved for an evaluation at cache `lengths`, and what a
    results table shows of it: budget, KV bytes per sequence (and per token) at the longest
    length, mean full-precision tokens over the lengths."""
    resolved = resolve(config, model_config, lengths)
    longest = max(lengths)
    total = kv_bytes(resolved, model_config, longest)
    facts = {
        "fp_budget": resolved.fp_budget or None,
        "kv_bytes": total,
        "kv_bytes_per_token": round(total / longest, 1),
        "mean_fp_tokens": round(mean_fp_tokens(resolved, lengths), 1),
    }
    return resolved, facts


def print_table(title: str, rows: list[str], cols: list[str], cells: dict[tuple[str, str], str]) -> None:
    width = max(10, *(len(c) for c in cols))
    first = max(12, *(len(r) for r in rows))
    print(f"\n{title}")
    print(f"{'':<{first}} | " + " | ".join(f"{c:>{width}}" for c in cols))
    for r in rows:
        print(f"{r:<{first}} | " + " | ".join(f"{cells.get((r, c), ''):>{width}}" for c in cols))


def write_json(path: Path | None, payload: dict, run_provenance: dict) -> None:
    """Write `payload` whole, with `run_provenance` (taken when the run started: command,
    commit, machine, model)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": run_provenance} | payload, indent=2))
    print(f"wrote {path}")
