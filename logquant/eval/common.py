"""Shared pieces of the evaluation tools: configurations, caches, tables, JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Cache, PreTrainedModel

from logquant.hf import LogQuantCache


@dataclass(frozen=True)
class CacheConfig:
    """One column of a comparison: a policy at a full-precision budget (fp16 has none)."""

    policy: str
    fp_budget: int = 0

    @property
    def label(self) -> str:
        return "fp16" if self.policy == "fp16" else f"{self.policy}@{self.fp_budget}"

    def make_cache(self, model: PreTrainedModel, group_size: int = 32) -> LogQuantCache:
        return LogQuantCache(model.config, policy=self.policy, fp_budget=self.fp_budget or 192, group_size=group_size)


def configs(policies: list[str], budgets: list[int]) -> list[CacheConfig]:
    """fp16 (the reference every mode compares with) plus each 2-bit policy at each budget."""
    return [CacheConfig("fp16")] + [CacheConfig(p, b) for b in budgets for p in policies if p != "fp16"]


@torch.inference_mode()
def feed(model: PreTrainedModel, cache: Cache, ids: list[int]) -> torch.Tensor:
    """Run `ids` as one chunk through the cache; return the logits of its last token [vocab]."""
    device = model.device
    return model(input_ids=torch.tensor([ids], device=device), cache=cache, logits_to_keep=1).logits[0, -1].float()


def print_table(title: str, rows: list[str], cols: list[str], cells: dict[tuple[str, str], str]) -> None:
    width = max(10, *(len(c) for c in cols))
    first = max(12, *(len(r) for r in rows))
    print(f"\n{title}")
    print(f"{'':<{first}} | " + " | ".join(f"{c:>{width}}" for c in cols))
    for r in rows:
        print(f"{r:<{first}} | " + " | ".join(f"{cells.get((r, c), ''):>{width}}" for c in cols))


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
