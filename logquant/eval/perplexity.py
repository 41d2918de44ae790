"""Perplexity of real text decoded token by token through each cache, plus greedy agreement
with the 16-bit cache (teacher-forced: the share of steps whose argmax equals fp16's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from logquant.eval.common import CacheConfig, feed


@dataclass(frozen=True)
class Predictions:
    """What a cache predicted after each token of a text: the log-prob of the true next token
    and the top token, `[T - 1]` each (entry i is the prediction for token i + 1)."""

    target_logprobs: torch.Tensor
    top_tokens: torch.Tensor


@torch.inference_mode()
def decode_predictions(model: PreTrainedModel, config: CacheConfig, ids: list[int], desc: str = "") -> Predictions:
    """Feed `ids` one token at a time through `config`'s cache (a concrete budget)."""
    cache = config.make_cache(model)
    targets, tops = [], []
    for index, token in enumerate(tqdm(ids[:-1], desc=desc or config.label, leave=False)):
        logprobs = torch.log_softmax(feed(model, cache, [token]), dim=-1)
        targets.append(logprobs[ids[index + 1]])
        tops.append(logprobs.argmax())
    return Predictions(torch.stack(targets), torch.stack(tops))


@torch.inference_mode()
def decode_predictions_many(
    model: PreTrainedModel, configs: list[CacheConfig], ids: list[int], desc: str = ""
) -> list[Predictions]:
    """`decode_predictions` for several configs at once: each is one row of a batch with its
    own cache (`batched.RowCaches`), so every step reads the model's weights once for all."""
    from logquant.eval.batched import RowCaches, feed_rows

    cache = RowCaches([config.make_cache(model) for config in configs])
    targets, tops = [], []
    for index, token in enumerate(tqdm(ids[:-1], desc=desc or f"{len(configs)} caches", leave=False)):
        logprobs = torch.log_softmax(feed_rows(model, cache, [[token]] * len(configs)), dim=-1)  # [rows, vocab]
        targets.append(logprobs[:, ids[index + 1]])
        tops.append(logprobs.argmax(dim=-1))
    target_rows, top_rows = torch.stack(targets, dim=1), torch.stack(tops, dim=1)  # [rows, T - 1]
    return [Predictions(t, k) for t, k in zip(target_rows, top_rows)]


def perplexity(predictions: Predictions, skip: int = 0) -> float:
    """exp(mean NLL) of the predicted tokens from the `skip`-th on."""
    return math.exp(float(-predictions.target_logprobs[skip:].mean()))


def argmax_agreement(predictions: Predictions, reference: Predictions, skip: int = 0) -> float:
    """Share of steps (from `skip`) where the top token equals the reference cache's."""
    return float((predictions.top_tokens[skip:] == reference.top_tokens[skip:]).float().mean())


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
