"""Perplexity of real text decoded token by token through each cache, plus greedy agreement
with the 16-bit cache (teacher-forced: the share of steps whose argmax equals fp16's)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from logquant.eval.common import CacheConfig, feed


@torch.inference_mode()
def decode_logits(model: PreTrainedModel, config: CacheConfig, ids: list[int], desc: str = "") -> torch.Tensor:
    """Feed `ids` one token at a time; return the next-token log-probs after each [T-1, vocab]
    (the prediction for token i+1 made after token i). `config` has a concrete budget."""
    cache = config.make_cache(model)
    rows = []
    for token in tqdm(ids[:-1], desc=desc or config.label, leave=False):
        rows.append(torch.log_softmax(feed(model, cache, [token]), dim=-1))
    return torch.stack(rows)


def perplexity(logprobs: torch.Tensor, ids: list[int], skip: int = 0) -> float:
    """exp(mean NLL) of tokens ids[skip+1:] under `logprobs` from `decode_logits`."""
    targets = torch.tensor(ids[1:])
    nll = -logprobs.gather(1, targets[:, None])[:, 0]
    return math.exp(float(nll[skip:].mean()))


def argmax_agreement(logprobs: torch.Tensor, reference: torch.Tensor, skip: int = 0) -> float:
    """Share of steps (from `skip`) where the top token equals the reference cache's."""
    return float((logprobs[skip:].argmax(-1) == reference[skip:].argmax(-1)).float().mean())


@torch.inference_mode()
def greedy_continuation(model: PreTrainedModel, prompt: list[int], num_tokens: int, eos: set[int]) -> list[int]:
    """fp16-cache greedy tokens after `prompt` (stops early at EOS)."""
    cache = CacheConfig("fp16").make_cache(model)
    logits = feed(model, cache, prompt)
    out: list[int] = []
    for _ in range(num_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token in eos:
            break
        logits = feed(model, cache, [token])
    return out


@torch.inference_mode()
def forced_agreement(
    model: PreTrainedModel, config: CacheConfig, prompt: list[int], continuation: list[int]
) -> tuple[int, int]:
    """Prefill `prompt`, then decode the fp16 continuation through `config`'s cache; count the
    steps whose greedy token matches it. Returns (matches, steps)."""
    cache = config.make_cache(model)
    logits = feed(model, cache, prompt)
    matches = 0
    for token in continuation:
        matches += int(int(logits.argmax()) == token)
        logits = feed(model, cache, [token])
    return matches, len(continuation)
