"""Model runner: the only engine code that touches tensors.

Packs every scheduled chunk of a step into one flat batch `[1, num_tokens]` (no padding),
runs the Hugging Face model once with our attention (registered with transformers'
`AttentionInterface`), which reads and writes the paged KV store per sequence, and samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from logquant.layout import KVLayout, head_dim_of
from logquant.store import AppendPlan, PagedKVStore
from server.engine.request import Sequence
from server.engine.sampler import SampleResult, sample
from server.engine.scheduler import SchedulerOutput

ATTENTION_NAME = "logquant_paged"


@dataclass(frozen=True)
class StepBatch:
    """Per-sequence metadata passed through `model(...)` to every attention layer."""

    store: PagedKVStore
    segments: list[tuple[AppendPlan, int, int]]  # (plan, start row, end row) in the flat batch


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, num_tokens, head_dim]
    value: torch.Tensor,  # [1, kv_heads, num_tokens, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch: StepBatch = kwargs["logquant_batch"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [num_tokens, heads, head_dim]
    scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for plan, start, end in batch.segments:
        out[start:end] = batch.store.forward(module.layer_idx, plan, q[start:end], k[start:end], v[start:end], scaling)
    return out.unsqueeze(0), None  # [1, num_tokens, heads, head_dim]


def _no_mask(*args, **kwargs) -> None:
    return None  # our attention builds its own per-sequence causal masks


AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def layout_for(model: PreTrainedModel, policy, dtype: torch.dtype, group_size: int) -> KVLayout:
    config = model.config.get_text_config(decoder=True)
    return KVLayout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim_of(config),
        policy=policy,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        group_size=group_size,
    )


class ModelRunner:
    def __init__(self, model: PreTrainedModel, store: PagedKVStore) -> None:
        self.model = model
        self.store = store
        self.device = store.device
        model.set_attn_implementation(ATTENTION_NAME)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, sequences: dict[str, Sequence]) -> dict[str, SampleResult]:
        for seq_id in output.freed_seq_ids:
            if seq_id in self.store.sequences:
                self.store.free_sequence(seq_id)
        if not output.chunks:
            return {}
        token_ids, positions, segments, sample_rows, sample_ids = [], [], [], [], []
        for chunk in output.chunks:
            if chunk.first_chunk:
                self.store.add_sequence(chunk.seq_id)
            self.store.add_pages(chunk.seq_id, chunk.new_pages.fp_pages, chunk.new_pages.q_pages)
            plan = self.store.plan_append(chunk.seq_id, len(chunk.token_ids))
            start = len(token_ids)
            token_ids += chunk.token_ids
            positions += range(chunk.start_position, chunk.start_position + len(chunk.token_ids))
            segments.append((plan, start, len(token_ids)))
            if chunk.sample:
                sample_rows.append(len(token_ids) - 1)
                sample_ids.append(chunk.seq_id)
        if not sample_rows:
            self._forward(token_ids, positions, segments, logits_rows=[len(token_ids) - 1])
            return {}
        logits = self._forward(token_ids, positions, segments, sample_rows)  # [num_sample, vocab]
        results = sample(logits, [sequences[s] for s in sample_ids])
        return dict(zip(sample_ids, results))

    def _forward(
        self, token_ids: list[int], positions: list[int], segments: list, logits_rows: list[int]
    ) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([token_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=None,
            use_cache=False,
            logits_to_keep=torch.tensor(logits_rows, device=self.device),
            logquant_batch=StepBatch(self.store, segments),
        )
        return out.logits[0]
