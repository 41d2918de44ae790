"""Batched sampling over rows: penalties, logit bias, min_tokens, grammar masks, temperature,
top-k, top-p, min-p, seeds, logprobs.

A function of its inputs: the logits, the rows' sequences (read only: their settings and
tokens) and the grammar masks of the constrained rows, which the engine core's
`StructuredOutputManager` fills; the sampler keeps no state between calls.

Every step of the pipeline runs once over all rows (per-row settings are tensors), and the
chosen tokens reach Python with one `.tolist()` (logprobs with two more, for the rows that ask);
nothing syncs per row (top-p checks once per candidate size whether every row's nucleus fit).

- Numerics: temperatures below `GREEDY_TEMPERATURE` are greedy; logits are shifted by their row
  maximum before dividing by the temperature (no overflow); penalties are clamped to finite
  values; the best token always survives top-k/top-p/min-p, so every row keeps a candidate.
- Sampling is by inverse CDF: one uniform number per row. Seeded rows draw theirs from a
  generator seeded by (seed, sample index, output length), so a seed gives the same tokens
  whatever else is in the batch and across preemption/recompute.
- Logprobs are those of the model's distribution (log-softmax of the raw logits), as in vLLM,
  floored at `LOGPROB_FLOOR` so that they stay finite (JSON has no -inf).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from server.engine.outputs import SampleResult
from server.engine.processors import apply_logit_bias, apply_min_tokens, apply_penalties, has_count_penalty
from server.engine.request import SamplingParams, SequenceState

LOGPROB_FLOOR = -9999.0
# top-k/top-p look for the nucleus among this many best tokens first (a sort of the whole
# vocabulary costs ~5 ms a row on CPU); a row whose nucleus is larger falls back to the next size.
CANDIDATE_SIZES = (128, 2048)
CDF_BLOCK = 256


@dataclass(frozen=True)
class GrammarMasks:
    """The tokens the grammars allow, for the constrained rows of a batch."""

    rows: list[int]  # rows of the batch with a structured-output constraint
    allowed: torch.Tensor  # [len(rows), vocab] bool


def sample(logits: torch.Tensor, seqs: list[SequenceState], masks: GrammarMasks | None = None) -> list[SampleResult]:
    """logits: [len(seqs), vocab] for the last position of each sequence. `masks` is needed
    when a sequence has a structured-output constraint."""
    assert logits.shape[0] == len(seqs), "one row of logits per sequence"
    if not seqs:
        return []
    raw = logits.float()
    processed = process_logits(raw, seqs, masks)
    tokens = choose_tokens(processed, seqs)
    return _results(raw, tokens, seqs)


def process_logits(logits: torch.Tensor, seqs: list[SequenceState], masks: GrammarMasks | None = None) -> torch.Tensor:
    """Penalties, logit bias, grammar masks and min_tokens (on a copy; `logits` itself when
    no row has any of them)."""
    if not any(_modifies_logits(seq) for seq in seqs):
        return logits
    out = apply_penalties(logits, seqs)
    apply_logit_bias(out, seqs)
    if any(seq.params.structured is not None for seq in seqs):
        apply_grammar_masks(out, masks)
    apply_min_tokens(out, seqs)
    return out


def apply_grammar_masks(logits: torch.Tensor, masks: GrammarMasks | None) -> None:
    """Set the logits of tokens the grammar forbids to -inf, in place, for the masked rows."""
    if masks is None:
        raise RuntimeError("a structured-output row reached the sampler without its grammar mask")
    index = torch.tensor(masks.rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~masks.allowed.to(logits.device), float("-inf"))


def _modifies_logits(seq: SequenceState) -> bool:
    p = seq.params
    return bool(
        p.repetition_penalty != 1.0
        or has_count_penalty(p)
        or p.logit_bias
        or p.structured is not None
        or len(seq.output_token_ids) < p.min_tokens
    )


def choose_tokens(logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
    """One token id per row: argmax for greedy rows, a draw for the others."""
    rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if len(rows) == len(seqs):
        return _draw(logits, seqs)
    tokens = logits.argmax(dim=-1)
    if rows:
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _draw(logits[index], [seqs[i] for i in rows])
    return tokens


def _draw(logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
    params = [seq.params for seq in seqs]
    temperature = _column([p.temperature for p in params], logits.device)
    scaled = logits.sub(logits.amax(dim=-1, keepdim=True)).div_(temperature)  # the best token is at 0
    weights = scaled.exp()
    threshold = _threshold(scaled, weights, params)
    if threshold is not None:
        weights.masked_fill_(scaled < threshold, 0.0)
    return _inverse_cdf(weights, _uniforms(seqs, logits.device))


def _threshold(scaled: torch.Tensor, weights: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """[rows, 1]: the lowest scaled logit that survives min-p, top-k and top-p (each keeps the
    tokens at or above some value, so together they keep those at or above the highest);
    None when no row filters. The best token (scaled 0) always survives."""
    threshold = None
    if any(p.min_p > 0.0 for p in params):  # p / p_best >= min_p  <=>  scaled >= log(min_p)
        threshold = _column([math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in params], scaled.device)
    vocab = scaled.shape[1]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        cutoff = _nucleus_threshold(scaled, weights, params)
        threshold = cutoff if threshold is None else torch.maximum(threshold, cutoff)
    return threshold


def _nucleus_threshold(scaled: torch.Tensor, weights: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k (ties with the k-th kept), then top-p over the renormalized top-k distribution (a
    token is kept if the better ones hold less than top_p of the mass), found among the best
    CANDIDATE_SIZES tokens first: a row is exact there once its candidates hold top_p."""
    vocab, device = scaled.shape[1], scaled.device
    top_k_values = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    largest_k = max((k for k in top_k_values if k < vocab), default=1)
    top_k = torch.tensor(top_k_values, device=device)[:, None]
    if all(p.top_p >= 1.0 for p in params):
        return _kth_best(scaled.topk(largest_k, dim=-1).values, top_k, vocab)
    top_p = _column([p.top_p if p.top_p < 1.0 else math.inf for p in params], device)
    total = weights.sum(dim=-1, keepdim=True)
    for size in sorted({min(vocab, max(size, largest_k)) for size in CANDIDATE_SIZES} | {vocab}):
        values = scaled.topk(size, dim=-1).values  # best first
        cutoff, covered = _cutoff_among_best(values, top_k, top_p, total, vocab)
        if size == vocab or bool(covered.all()):  # one sync per candidate size, not per row
            return cutoff
    raise AssertionError("the last candidate size is the whole vocabulary")


def _kth_best(values: torch.Tensor, top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, 1]: the k-th best value (values: each row's best, sorted), -inf where top-k is off."""
    kth = values.gather(1, top_k.clamp(max=values.shape[1]) - 1)
    return torch.where(top_k >= vocab, float("-inf"), kth)


def _cutoff_among_best(
    values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k/top-p cutoff found among the best `values` (>= top_k of them), and the rows
    it is exact for."""
    kth = _kth_best(values, top_k, vocab)
    has_top_k = top_k < vocab
    candidate = values.exp().masked_fill_(values < kth, 0.0)
    probs = candidate / torch.where(has_top_k, candidate.sum(dim=-1, keepdim=True), total)
    mass = probs.cumsum(dim=-1)
    kept = (mass - probs) < top_p  # a prefix: the mass before a token only grows
    kept[:, 0] = True  # the best token survives any top_p, however small
    last_kept = values.gather(1, kept.sum(dim=-1, keepdim=True) - 1)
    no_top_p = torch.isinf(top_p)
    covered = (mass[:, -1:] >= top_p) | no_top_p | has_top_k
    return torch.where(no_top_p, kth, torch.maximum(last_kept, kth)), covered


def _uniforms(seqs: list[SequenceState], device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per row; seeded rows get theirs from their own generator."""
    uniforms = torch.rand(len(seqs), dtype=torch.float64, device=device)
    seeded = [i for i, seq in enumerate(seqs) if seq.params.seed is not None]
    if seeded:
        values = [_seeded_uniform(seqs[i]) for i in seeded]
        uniforms[torch.tensor(seeded, device=device)] = torch.tensor(values, dtype=torch.float64, device=device)
    return uniforms


def _seeded_uniform(seq: SequenceState) -> float:
    """A function of (seed, sample index, output length) only (string seeds hash with SHA-512,
    the same in every process)."""
    return random.Random(f"{seq.params.seed}:{seq.index}:{len(seq.output_token_ids)}").random()


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative weight exceeds uniform * total, in two float64 levels:
    blocks of up to CDF_BLOCK tokens, then the tokens of the chosen block (a float64 cumsum of
    the whole row costs ~5x more). If rounding points at a token of weight 0, the best token
    of the chosen block (which has weight) is taken instead."""
    rows, vocab = weights.shape
    width = math.gcd(vocab, CDF_BLOCK)
    blocks = weights.reshape(rows, vocab // width, width)
    block_sums = blocks.sum(dim=-1).double()
    block_cdf = block_sums.cumsum(dim=-1)
    total = block_cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(block_cdf, target, right=True)  # block_cdf[block] > target: it has weight
    remaining = target - (block_cdf.gather(1, block) - block_sums.gather(1, block))
    inner = blocks.gather(1, block[:, :, None].expand(-1, -1, width))[:, 0]
    offset = torch.searchsorted(inner.double().cumsum(dim=-1), remaining, right=True).clamp(max=width - 1)
    offset = torch.where(inner.gather(1, offset) > 0, offset, inner.argmax(dim=-1, keepdim=True))
    return (block * width + offset)[:, 0]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_counts: list[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """logits [rows, vocab], tokens [rows] -> per row, the log-prob of its token and its
    `top_counts[row]` most likely (token id, log-prob), best first; floored at LOGPROB_FLOOR."""
    logprobs = logits.log_softmax(dim=-1)
    top_values, top_ids = logprobs.topk(max(top_counts), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    values = torch.cat([chosen, top_values], dim=1).clamp(min=LOGPROB_FLOOR).tolist()
    ids = top_ids.tolist()
    return [(values[row][0], list(zip(ids[row][:k], values[row][1 : k + 1]))) for row, k in enumerate(top_counts)]


def _results(raw: torch.Tensor, tokens: torch.Tensor, seqs: list[SequenceState]) -> list[SampleResult]:
    token_ids = tokens.tolist()
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    results = [SampleResult(token) for token in token_ids]
    if not rows:
        return results
    index = torch.tensor(rows, device=raw.device)
    counts = [seqs[i].params.logprobs or 0 for i in rows]
    for i, (chosen, top) in zip(rows, token_logprobs(raw[index], tokens[index], counts)):
        results[i] = SampleResult(token_ids[i], chosen, top)
    return results


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]
