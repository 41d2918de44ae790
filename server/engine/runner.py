"""Model runner: the only engine code that touches tensors.

`execute(scheduler_output)` packs every scheduled chunk of a step into one flat batch
`[1, num_tokens]` (no padding), turns the step's `StepPlan` (carried by the scheduler's output)
into index tensors once, and runs the Hugging Face model once
with our attention (registered with transformers' `AttentionInterface`): in every layer one
`PagedKVStore.forward` call attends all of the step's sequences and writes their new tokens.
Then it samples the rows that end a sequence's known tokens, with the grammar masks of the
constrained ones from the core's `StructuredOutputManager`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from logquant.step import StepTensors
from logquant.store import PagedKVStore
from server.engine.outputs import PromptLogprobs, SampleResult, ScheduledChunk, SchedulerOutput, StepResult
from server.engine.request import SequenceState
from server.engine.sampler import sample, token_logprobs
from server.engine.structured_outputs import StructuredOutputManager

ATTENTION_NAME = "logquant_paged"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRow:
    """A row of the step whose next token is a prompt token of a `prompt_logprobs` request."""

    seq_id: str
    row: int  # row of the flat batch
    position: int  # position of the prompt token it predicts
    target: int  # that token
    num_top: int  # top alternatives the request asked for


@dataclass
class FlatBatch:
    """A step's chunks packed into one flat batch of rows."""

    token_ids: list[int]
    positions: list[int]
    sample_rows: list[int]  # rows whose next token is sampled
    sample_seqs: list[SequenceState]  # their sequences
    prompt_rows: list[PromptRow]

    @classmethod
    def pack(cls, chunks: list[ScheduledChunk]) -> FlatBatch:
        batch = cls([], [], [], [], [])
        for chunk in chunks:
            batch.prompt_rows += _prompt_rows(chunk, len(batch.token_ids))
            batch.token_ids += chunk.token_ids
            batch.positions += range(chunk.start_position, chunk.start_position + len(chunk.token_ids))
            if chunk.sample:
                batch.sample_rows.append(len(batch.token_ids) - 1)
                batch.sample_seqs.append(chunk.seq)
        return batch


@dataclass(frozen=True)
class StepBatch:
    """What `model(...)` passes to every attention layer: the store and the step's tensors."""

    store: PagedKVStore
    step: StepTensors


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
    layer = module.layer_idx
    window = batch.store.group(layer).window
    assert window is None or kwargs.get("sliding_window") == window, f"layer {layer}: the layout's window is {window}"
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [num_tokens, heads, head_dim]
    scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    out = batch.store.forward(layer, batch.step, q, k, v, scaling, softcap=softcap, sinks=sinks)
    return out.unsqueeze(0), None  # [1, num_tokens, heads, head_dim]


def _no_mask(*args, **kwargs) -> None:
    return None  # our attention builds its own per-sequence causal masks


AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, store: PagedKVStore, structured: StructuredOutputManager | None = None
    ) -> None:
        """`structured`: the grammar masks of structured-output rows (needed only for them)."""
        self.model = model
        self.store = store
        self.structured = structured
        self.device = store.device
        model.set_attn_implementation(ATTENTION_NAME)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> StepResult:
        """Run the step's chunks with their KV plan (`output.plan`, same order); sample."""
        if not output.chunks:
            return StepResult()
        assert output.plan is not None, "scheduled chunks come with their plan"
        batch = FlatBatch.pack(output.chunks)
        step = self.store.prepare(output.plan)
        rows = batch.sample_rows + [r.row for r in batch.prompt_rows]
        logits = self._forward(
            batch.token_ids, batch.positions, step, rows or [len(batch.token_ids) - 1]
        )  # [rows, vocab]
        num_sampled = len(batch.sample_rows)
        sampled, failed = self._sample(logits[:num_sampled], batch.sample_seqs) if num_sampled else ({}, {})
        prompt_logprobs = _prompt_logprobs(logits[num_sampled:], batch.prompt_rows) if batch.prompt_rows else {}
        return StepResult(sampled, failed, prompt_logprobs)

    def _sample(
        self, logits: torch.Tensor, seqs: list[SequenceState]
    ) -> tuple[dict[str, SampleResult], dict[str, Exception]]:
        """Sample every row at once; if that fails, row by row, so that only the rows that
        fail (e.g. a request whose parameters break the numerics) lose their sequence."""
        try:
            return {s.seq_id: r for s, r in zip(seqs, self._sample_rows(logits, seqs))}, {}
        except Exception:
            logger.exception("batched sampling failed; retrying the %d rows one by one", len(seqs))
        sampled, failed = {}, {}
        for row, seq in enumerate(seqs):
            try:
                (sampled[seq.seq_id],) = self._sample_rows(logits[row : row + 1], [seq])
            except Exception as exc:
                logger.exception("sampling failed for %s", seq.seq_id)
                failed[seq.seq_id] = exc
        return sampled, failed

    def _sample_rows(self, logits: torch.Tensor, seqs: list[SequenceState]) -> list[SampleResult]:
        masks = self.structured.grammar_masks(seqs, logits.shape[1]) if self.structured is not None else None
        return sample(logits, seqs, masks)

    def _forward(
        self, token_ids: list[int], positions: list[int], step: StepTensors, logits_rows: list[int]
    ) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([token_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=None,
            use_cache=False,
            logits_to_keep=torch.tensor(logits_rows, device=self.device),
            logquant_batch=StepBatch(self.store, step),
        )
        return out.logits[0]


def _prompt_rows(chunk: ScheduledChunk, first_row: int) -> list[PromptRow]:
    """The chunk's rows that predict prompt tokens whose logprob its sequence still needs (a
    recomputed prefill after preemption skips the positions already recorded)."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None:
        return []
    prompt, start = seq.prompt_token_ids, chunk.start_position
    have = len(seq.prompt_logprobs) + 1  # positions 1.. are recorded in order
    return [
        PromptRow(seq.seq_id, first_row + j, start + j + 1, prompt[start + j + 1], seq.params.prompt_logprobs)
        for j in range(len(chunk.token_ids))
        if have <= start + j + 1 < len(prompt)
    ]


def _prompt_logprobs(logits: torch.Tensor, rows: list[PromptRow]) -> dict[str, PromptLogprobs]:
    """logits [len(rows), vocab] -> per sequence, its first position and the entries from it."""
    targets = torch.tensor([r.target for r in rows], device=logits.device)
    out: dict[str, PromptLogprobs] = {}
    for r, (chosen, top) in zip(rows, token_logprobs(logits.float(), targets, [r.num_top for r in rows])):
        out.setdefault(r.seq_id, PromptLogprobs(r.position, [])).entries.append({"logprob": chosen, "top": top})
    return out
