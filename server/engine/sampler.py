"""Per-row sampling: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Seeded rows draw from a generator seeded by (seed, sample index, output length), so a seed
gives the same tokens whatever else is in the batch and across preemption/recompute.
Logprobs are those of the model's distribution (log-softmax of the raw logits), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams, Sequence


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
    """logits: [len(seqs), vocab] for the last position of each sequence."""
    assert logits.shape[0] == len(seqs), "one row of logits per sequence"
    logits = logits.float()
    results = []
    for row, seq in zip(logits, seqs):
        processed = apply_penalties(row, seq)
        token = _choose(processed, seq)
        results.append(_with_logprobs(row, token, seq.params))
    return results


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    params = seq.params
    out = logits
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids())), dtype=torch.long, device=logits.device)
        picked = out[seen]
        out = out.clone()
        out[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_token_ids:
        ids = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[0]).float()[: logits.shape[0]]
        out = out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return out


def _choose(logits: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= params.top_p
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=probs.device)
        generator.manual_seed(hash((params.seed, seq.index, len(seq.output_token_ids))) & (2**63 - 1))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _with_logprobs(raw_logits: torch.Tensor, token: int, params: SamplingParams) -> SampleResult:
    if params.logprobs is None:
        return SampleResult(token)
    logprobs = torch.log_softmax(raw_logits, dim=-1)
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return SampleResult(token, float(logprobs[token]), top)
