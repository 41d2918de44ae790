"""What the evaluations need from a serving engine. The library never imports the server: the
engine comes in as an argument (`bench/eval_engine.py` passes one that drives
`server.engine.LLM`), so `python bench/eval_engine.py ppl ...` runs the same evaluation as
`python -m logquant.eval ppl ...` through the server's engine instead of `LogQuantCache`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logquant.eval.configs import CacheConfig
from logquant.eval.perplexity import Predictions

ENGINE_MODES = ("ppl", "passkey")  # the evaluations that run through an engine
# (model, tokenizer, config with a concrete budget, prompts, max_tokens) -> greedy completions
GenerateFn = Callable[[PreTrainedModel, PreTrainedTokenizerBase, CacheConfig, list[list[int]], int], list[str]]
# (model, tokenizer, config, ids) -> what the compressed cache predicts, ids fed one token per step
PredictFn = Callable[[PreTrainedModel, PreTrainedTokenizerBase, CacheConfig, list[int]], Predictions]


@dataclass(frozen=True)
class EvalEngine:
    generate: GenerateFn
    predictions: PredictFn
