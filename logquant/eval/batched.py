"""Several caches in one forward pass: batch row r runs through `caches[r]`.

The evaluations compare many cache configurations on the same tokens. On a CPU a decode step
of a model is bound by reading its weights, so running the configurations as the rows of one
batch reads the weights once per step for all of them instead of once per configuration.
Each row has its own `LogQuantCache` (its own KV manager and store, batch 1), so a row sees
exactly what it would see alone: only the model's matmuls are batched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from logquant.hf import LogQuantCache


class _RowsLayer(DynamicLayer):
    """Layer `layer_idx` of every row's cache."""

    is_croppable = False

    def __init__(self, caches: list[LogQuantCache], layer_idx: int) -> None:
        super().__init__()
        self.caches, self.layer_idx = caches, layer_idx
        self.is_sliding = caches[0].layers[layer_idx].is_sliding

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [rows, kv_heads, new, head_dim]; row r goes to cache r."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        outs = [
            cache.layers[self.layer_idx].update(key_states[r : r + 1], value_states[r : r + 1])
            for r, cache in enumerate(self.caches)
        ]
        return torch.cat([k for k, _ in outs]), torch.cat([v for _, v in outs])

    def get_seq_length(self) -> int:
        return self.caches[0].layers[self.layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.caches[0].layers[self.layer_idx].get_mask_sizes(query_length)


class RowCaches(Cache):
    """One `LogQuantCache` per batch row, all fed the same number of tokens per step."""

    def __init__(self, caches: list[LogQuantCache]) -> None:
        self.caches = caches
        super().__init__(layers=[_RowsLayer(caches, i) for i in range(len(caches[0].layers))])


@torch.inference_mode()
def feed_rows(model, cache: RowCaches, ids: list[list[int]]) -> torch.Tensor:
    """Run row r's tokens `ids[r]` (equal lengths) through the caches; the logits of each
    row's last token, `[rows, vocab]` float32."""
    tokens = torch.tensor(ids, device=model.device)
    return model(input_ids=tokens, cache=cache, logits_to_keep=1).logits[:, -1].float()
