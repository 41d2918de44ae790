"""Passkey retrieval: a 5-digit number hidden at a random depth in real text (Paul Graham's
essays), then asked for. The context is prefilled as one chunk; the question is a second
chunk that attends to the already-compressed cache; the answer is decoded greedily."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from logquant.eval.common import CacheConfig, feed

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


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


@torch.inference_mode()
def prefill(model: PreTrainedModel, case: PasskeyCase) -> DynamicCache:
    """The context's keys and values. Prefill attends at full precision under every policy,
    so one prefill serves all of them (`answer` stores it into each policy's cache)."""
    cache = DynamicCache(config=model.config)
    feed(model, cache, case.context_ids)
    return cache


@torch.inference_mode()
def answer(
    model: PreTrainedModel, config: CacheConfig, case: PasskeyCase, tokenizer, context: DynamicCache,
    max_new_tokens: int = 16,
) -> str:  # fmt: skip
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


def is_correct(case: PasskeyCase, text: str) -> bool:
    return case.key in re.sub(r"[^0-9]", "", text)[:10]
