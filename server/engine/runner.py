"""Model runner: the only engine code that touches tensors.

Packs every scheduled chunk of a step into one flat batch `[1, num_tokens]` (no padding),
turns the step's `StepPlan` into index tensors once, and runs the Hugging Face model once
with our attention (registered with transformers' `AttentionInterface`): in every layer one
`PagedKVStore.forward` call attends all of the step's sequences and writes their new tokens.
Then it samples the rows that end a sequence's known tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import AttentionMaskInterface

from logquant.attention_spec import attention_spec
from logquant.kv_manager import StepPlan
from logquant.layout import KVLayout, head_dim_of
from logquant.step import StepTensors
from logquant.store import PagedKVStore
from server.engine.request import Sequence
from server.engine.sampler import SampleResult, sample, token_logprobs
from server.engine.scheduler import ScheduledChunk, SchedulerOutput

ATTENTION_NAME = "logquant_paged"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, SampleResult]  # seq_id -> the token sampled for it
    failed: dict[str, Exception]  # seq_id -> why its row could not be sampled
    # seq_id -> (first prompt position covered, one {"logprob", "top"} per position from there)
    prompt_logprobs: dict[str, tuple[int, list[dict]]] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptRow:
    """A row of the step whose next token is a prompt token of a `prompt_logprobs` request."""

    seq_id: str
    row: int  # row of the flat batch
    position: int  # position of the prompt token it predicts
    target: int  # that token


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


def layout_for(
    model: PreTrainedModel, policy, dtype: torch.dtype, group_size: int, key_fp_channels: int = 0, bits: int = 2
) -> KVLayout:
    """The model's KV layout; raises UnsupportedModelError for attention we cannot run."""
    config = model.config.get_text_config(decoder=True)
    return KVLayout(
        layer_windows=attention_spec(model.config).windows,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim_of(config),
        policy=policy,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        group_size=group_size,
        key_fp_channels=key_fp_channels,
        bits=bits,
    )


class ModelRunner:
    def __init__(self, model: PreTrainedModel, store: PagedKVStore, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.model = model
        self.store = store
        self.tokenizer = tokenizer  # for structured-output masks
        self.device = store.device
        model.set_attn_implementation(ATTENTION_NAME)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, plan: StepPlan, sequences: dict[str, Sequence]) -> StepResult:
        """Run the step's chunks (`plan` is their KV plan, in the same order); sample."""
        token_ids, positions, sample_rows, sample_ids, prompt_rows = [], [], [], [], []
        for chunk in output.chunks:
            prompt_rows += _prompt_rows(chunk, sequences[chunk.seq_id], len(token_ids))
            token_ids += chunk.token_ids
            positions += range(chunk.start_position, chunk.start_position + len(chunk.token_ids))
            if chunk.sample:
                sample_rows.append(len(token_ids) - 1)
                sample_ids.append(chunk.seq_id)
        step = self.store.prepare(plan)
        rows = sample_rows + [r.row for r in prompt_rows]
        logits = self._forward(token_ids, positions, step, rows or [len(token_ids) - 1])  # [len(rows), vocab]
        result = StepResult({}, {})
        if sample_rows:
            result = self._sample(logits[: len(sample_rows)], [sequences[s] for s in sample_ids])
        if prompt_rows:
            result.prompt_logprobs.update(_prompt_logprobs(logits[len(sample_rows) :], prompt_rows, sequences))
        return result

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> StepResult:
        """Sample every row at once; if that fails, row by row, so that only the rows that
        fail (e.g. a request whose parameters break the numerics) lose their sequence."""
        try:
            return StepResult({s.seq_id: r for s, r in zip(seqs, sample(logits, seqs, tokenizer=self.tokenizer))}, {})
        except Exception:
            logger.exception("batched sampling failed; retrying the %d rows one by one", len(seqs))
        result = StepResult({}, {})
        for row, seq in enumerate(seqs):
            try:
                (result.sampled[seq.seq_id],) = sample(logits[row : row + 1], [seq], tokenizer=self.tokenizer)
            except Exception as exc:
                logger.exception("sampling failed for %s", seq.seq_id)
                result.failed[seq.seq_id] = exc
        return result

    def _forward(self, token_ids: list[int], positions: list[int], step: StepTensors, logits_rows: list[int]) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([token_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=None,
            use_cache=False,
            logits_to_keep=torch.tensor(logits_rows, device=self.device),
            logquant_batch=StepBatch(self.store, step),
        )
        return out.logits[0]


def _prompt_rows(chunk: ScheduledChunk, seq: Sequence, first_row: int) -> list[PromptRow]:
    """The chunk's rows that predict prompt tokens whose logprob `seq` still needs (a
    recomputed prefill after preemption skips the positions already recorded)."""
    if seq.params.prompt_logprobs is None:
        return []
    prompt = seq.prompt_token_ids
    have = len(seq.prompt_logprobs) + 1  # positions 1.. are recorded in order
    return [
        PromptRow(seq.seq_id, first_row + j, chunk.start_position + j + 1, prompt[chunk.start_position + j + 1])
        for j in range(len(chunk.token_ids))
        if have <= chunk.start_position + j + 1 < len(prompt)
    ]


def _prompt_logprobs(
    logits: torch.Tensor, rows: list[PromptRow], sequences: dict[str, Sequence]
) -> dict[str, tuple[int, list[dict]]]:
    """logits [len(rows), vocab] -> per sequence, its first position and the entries from it."""
    targets = torch.tensor([r.target for r in rows], device=logits.device)
    counts = [sequences[r.seq_id].params.prompt_logprobs or 0 for r in rows]
    out: dict[str, tuple[int, list[dict]]] = {}
    for r, (chosen, top) in zip(rows, token_logprobs(logits.float(), targets, counts)):
        out.setdefault(r.seq_id, (r.position, []))[1].append({"logprob": chosen, "top": top})
    return out
