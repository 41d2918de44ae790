"""The evaluations of `python -m logquant.eval` through the serving engine (`server.engine.LLM`)
instead of `LogQuantCache`: the same model object, one `LLM` per cache configuration.

    python bench/eval_engine.py ppl --length 1024 --configs "fp16,kivi@192,logquant@192" --json results/x.json
    python bench/eval_engine.py passkey --lengths 1024 --cases 6 --budgets 192

Takes every option of `python -m logquant.eval` (modes ppl and passkey). The engine takes the
policy, budget, bit width, sinks and key outlier channels; a window split other than
W = B // 3 is library-only and rejected here. The library does not import the server: this
script hands the engine to it (`logquant.eval.served.EvalEngine`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logquant.eval.__main__ import main
from logquant.eval.configs import GROUP_SIZE, CacheConfig
from logquant.eval.perplexity import Predictions
from logquant.eval.served import EvalEngine
from server.engine import LLM, SamplingParams

KV_CACHE_MEMORY = "2GiB"


@contextmanager
def engine_for(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: CacheConfig, **engine_options: int
) -> Iterator[LLM]:
    """An `LLM` over `model` for `config` (a concrete budget). The engine registers its own
    attention on the model; the model's previous attention is restored on exit."""
    if config.window_divisor != 3.0:
        raise ValueError(f"{config.label}: the engine runs W = B // 3 only")
    previous = model.config._attn_implementation
    try:
        yield LLM(
            model_object=model,
            tokenizer=tokenizer,
            policy=config.policy,
            fp_budget=config.fp_budget or 192,
            group_size=GROUP_SIZE,
            sink_tokens=config.sink_tokens,
            key_fp_channels=config.key_fp_channels,
            kv_bits=config.bits,
            kv_cache_memory=KV_CACHE_MEMORY,
            dtype=str(model.dtype).removeprefix("torch."),
            device=model.device.type,
            **engine_options,
        )
    finally:
        model.set_attn_implementation(previous)


def engine_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: CacheConfig,
    prompts: list[list[int]],
    max_tokens: int,
) -> list[str]:
    """Greedy completions of every prompt, batched by the engine's scheduler."""
    with engine_for(model, tokenizer, config) as llm:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return [out.outputs[0].text for out in outputs]


@torch.inference_mode()
def engine_predictions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: CacheConfig, ids: list[int]
) -> Predictions:
    """`ids` as one prompt with prompt logprobs, fed one token per step (chunks of 1, as
    `decode_predictions` feeds the cache), so every prediction reads the compressed cache."""
    with engine_for(model, tokenizer, config, max_num_batched_tokens=1, max_num_seqs=1) as llm:
        (out,) = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    entries = out.prompt_logprobs[1:]
    assert len(entries) == len(ids) - 1, "the engine skipped prompt positions"
    return Predictions(torch.tensor([e["logprob"] for e in entries]), torch.tensor([e["top"][0][0] for e in entries]))


if __name__ == "__main__":
    main(sys.argv[1:], engine=EvalEngine(engine_generate, engine_predictions), prog="python bench/eval_engine.py")
