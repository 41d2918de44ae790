"""Per-request logits processors of the sampler: penalties, logit bias and min_tokens.

Each runs once over the rows that use it, on (row, token) index tensors; what a request's
lists turn into (its logit-bias tensors, the tokens min_tokens masks) is built once per request
and kept in `SamplingParams.derived`, so a step costs the same however long those lists are.
"""

from __future__ import annotations

import itertools

import torch

from server.engine.request import SamplingParams, SequenceState

FLOAT_MAX = torch.finfo(torch.float32).max
FLOAT_TINY = torch.finfo(torch.float32).tiny


def apply_penalties(logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
    """Repetition penalty (HF rule, over prompt and output), then presence and frequency
    penalties (OpenAI rule, over the output). Returns a new tensor. Works on the (row, token)
    pairs that occur, not on whole rows."""
    out = logits.clone()
    vocab, device = out.shape[1], out.device
    rows = [i for i, seq in enumerate(seqs) if seq.params.repetition_penalty != 1.0]
    if rows:
        row, token, _ = _occurrences(rows, [seqs[i].token_ids() for i in rows], vocab, device)
        penalty = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=device)
        penalty = penalty.clamp(min=FLOAT_TINY)[torch.searchsorted(torch.tensor(rows, device=device), row)]
        picked = out[row, token]
        penalized = torch.where(picked > 0, picked / penalty, picked * penalty).clamp(-FLOAT_MAX, FLOAT_MAX)
        out[row, token] = torch.where(picked.isfinite(), penalized, picked)  # finite stays finite
    rows = [i for i, seq in enumerate(seqs) if has_count_penalty(seq.params) and seq.output_token_ids]
    if rows:
        row, token, count = _occurrences(rows, [seqs[i].output_token_ids for i in rows], vocab, device)
        local = torch.searchsorted(torch.tensor(rows, device=device), row)
        frequency = torch.tensor([seqs[i].params.frequency_penalty for i in rows], device=device)[local]
        presence = torch.tensor([seqs[i].params.presence_penalty for i in rows], device=device)[local]
        out[row, token] -= frequency * count + presence
    return out


def has_count_penalty(params: SamplingParams) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def apply_logit_bias(logits: torch.Tensor, seqs: list[SequenceState]) -> None:
    rows = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
    if not rows:
        return
    tokens, biases = zip(*(_logit_bias_tensors(seqs[i].params, logits.device) for i in rows))
    row = _rows_for(rows, tokens, logits.device)
    logits.index_put_((row, torch.cat(tokens)), torch.cat(biases).to(logits.dtype), accumulate=True)
    logits.clamp_(max=FLOAT_MAX)


def _logit_bias_tensors(params: SamplingParams, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[entries] token ids and their biases, built once per request (and device)."""
    key = ("logit_bias", device)
    if key not in params.derived:
        tokens, biases = zip(*params.logit_bias.items())
        params.derived[key] = (torch.tensor(tokens, device=device), torch.tensor(biases, device=device))
    return params.derived[key]  # type: ignore[return-value]


def apply_min_tokens(logits: torch.Tensor, seqs: list[SequenceState]) -> None:
    """Mask EOS (unless ignore_eos) and stop_token_ids until min_tokens output tokens, unless
    that would leave a row without any candidate (a finished grammar allows only EOS)."""
    rows = [i for i, seq in enumerate(seqs) if len(seq.output_token_ids) < seq.params.min_tokens]
    tokens = [_min_tokens_blocked(seqs[i], logits.device) for i in rows]
    if not rows or not any(len(t) for t in tokens):
        return
    index = (_rows_for(rows, tokens, logits.device), torch.cat(tokens))
    blocked = logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))
    has_candidate = (blocked > float("-inf")).any(dim=-1, keepdim=True)
    logits.copy_(torch.where(has_candidate, blocked, logits))


def _min_tokens_blocked(seq: SequenceState, device: torch.device) -> torch.Tensor:
    """[ids] the EOS and stop tokens masked before min_tokens, built once per request."""
    eos = () if seq.params.ignore_eos else seq.eos_token_ids
    key = ("min_tokens_blocked", eos, device)
    if key not in seq.params.derived:
        ids = sorted(seq.params.stop_token_set.union(eos))
        seq.params.derived[key] = torch.tensor(ids, dtype=torch.long, device=device)
    return seq.params.derived[key]  # type: ignore[return-value]


def _rows_for(
    rows: list[int], per_row: tuple[torch.Tensor, ...] | list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The row index of every element of `per_row` (one tensor per row of `rows`), concatenated."""
    lengths = torch.tensor([len(t) for t in per_row], device=device)
    return torch.repeat_interleave(torch.tensor(rows, device=device), lengths)


def _occurrences(
    rows: list[int], id_lists: list[list[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (row, token) pairs of `id_lists` (row: rows[i] for list i, ascending) and
    how often each occurs, sorted by row."""
    lengths = torch.tensor([len(ids) for ids in id_lists], device=device)
    row = torch.repeat_interleave(torch.tensor(rows, device=device), lengths)
    token = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long, device=device)
    keys, count = torch.unique(row * vocab + token, return_counts=True)
    return keys // vocab, keys % vocab, count.float()
