"""Passkey retrieval: a 5-digit number hidden at a random depth in real text (Paul Graham's
essays), then asked for. Through `LogQuantCache` the context is prefilled as one chunk (once,
shared by every column), the question is a second chunk that attends to the already-compressed
cache, and the answer is decoded greedily. Through a serving engine (`engine`, see `served.py`)
each column is one engine that serves all cases together, with its own prefill chunks."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from logquant.eval.common import CacheConfig, feed

if TYPE_CHECKING:
    from logquant.eval.served import EvalEngine

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_TOKENS = 16


@dataclass(frozen=True)
class PasskeyCase:
    key: str
    context_ids: list[int]  # chat-templated prefix up to the end of the haystack
    question_ids: list[int]  # the rest of the templated prompt


def make_case(
    tokenizer: PreTrainedTokenizerBase, haystack_ids: list[int], num_tokens: int, rng: random.Random
) -> PasskeyCase:
    """A prompt of about `num_tokens` tokens with the needle at a random depth."""
    key = str(rng.randint(10000, 99999))
    start = rng.randrange(0, len(haystack_ids) - num_tokens)
    filler = haystack_ids[start : start + num_tokens]
    depth = rng.randint(0, len(filler))
    before, after = tokenizer.decode(filler[:depth]), tokenizer.decode(filler[depth:])
    content = INTRO + before + NEEDLE.format(key=key) + after + QUESTION
    messages = [{"role": "user", "content": content}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    question_len = len(tokenizer.encode(QUESTION)) + 8  # the question plus the template's tail
    return PasskeyCase(key, ids[:-question_len], ids[-question_len:])


def run_cases(
    model: PreTrainedModel,
    tokenizer,
    cases: list[PasskeyCase],
    configs: list[CacheConfig],
    engine: EvalEngine | None,
    desc: str,
) -> list[list[str]]:
    """The greedy answer of every case under every config (`configs` have concrete budgets):
    `answers[config][case]`, through `engine` if given."""
    if engine is not None:
        prompts = [case.context_ids + case.question_ids for case in cases]
        return [engine.generate(model, tokenizer, c, prompts, ANSWER_TOKENS) for c in tqdm(configs, desc=desc)]
    answers: list[list[str]] = [[] for _ in configs]
    for case in tqdm(cases, desc=desc):
        context = prefill(model, case)
        for column, text in enumerate(answer_many(model, configs, case, tokenizer, context)):
            answers[column].append(text)
    return answers


@torch.inference_mode()
def prefill(model: PreTrainedModel, case: PasskeyCase) -> DynamicCache:
    """The context's keys and values. Prefill attends at full precision under every policy,
    so one prefill serves all of them (`answer` stores it into each policy's cache). Every
    layer keeps every token here (no config: sliding-window layers too, so each cache gets the
    whole context and keeps its own window of it); the model's masks still apply the windows."""
    cache = DynamicCache()
    feed(model, cache, case.context_ids)
    return cache


@torch.inference_mode()
def answer(
    model: PreTrainedModel,
    config: CacheConfig,
    case: PasskeyCase,
    tokenizer,
    context: DynamicCache,
    max_new_tokens: int = ANSWER_TOKENS,
) -> str:
    """Store the prefilled context into `config`'s cache, then ask the question; greedy."""
    cache = config.make_cache(model)
    for index, layer in enumerate(context.layers):
        cache.update(layer.keys, layer.values, index)  # same as prefilling through `cache`
    logits = feed(model, cache, case.question_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        logits = feed(model, cache, [token])
    return tokenizer.decode(out, skip_special_tokens=True)


@torch.inference_mode()
def answer_many(
    model: PreTrainedModel,
    configs: list[CacheConfig],
    case: PasskeyCase,
    tokenizer,
    context: DynamicCache,
    max_new_tokens: int = ANSWER_TOKENS,
) -> list[str]:
    """`answer` for several configs at once, one batch row each (`batched.RowCaches`): a row
    that reaches EOS stops answering while the others go on."""
    from logquant.eval.batched import RowCaches, feed_rows

    caches = [config.make_cache(model) for config in configs]
    for cache in caches:
        for index, layer in enumerate(context.layers):
            cache.update(layer.keys, layer.values, index)  # same as prefilling through `cache`
    rows = RowCaches(caches)
    logits = feed_rows(model, rows, [case.question_ids] * len(configs))
    out: list[list[int]] = [[] for _ in configs]
    done = [False] * len(configs)
    for _ in range(max_new_tokens):
        tokens = logits.argmax(dim=-1).tolist()
        for row, token in enumerate(tokens):
            done[row] = done[row] or token == tokenizer.eos_token_id
            if not done[row]:
                out[row].append(token)
        if all(done):
            break
        logits = feed_rows(model, rows, [[token] for token in tokens])
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out]


def is_correct(case: PasskeyCase, text: str) -> bool:
    return case.key in re.sub(r"[^0-9]", "", text)[:10]
