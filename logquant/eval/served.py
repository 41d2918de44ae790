"""What the evaluations need from a serving engine. The library never imports the server: the
engine comes in as an argument (`bench/eval_engine.py` passes `ServedEngine`, which drives
`server.engine.LLM`), so `python bench/eval_engine.py ppl ...` runs the same evaluation as
`python -m logquant.eval ppl ...` through the server's engine instead of `LogQuantCache`."""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logquant.eval.configs import CacheConfig
from logquant.eval.perplexity import Predictions

ENGINE_MODES = ("ppl", "passkey")  # the evaluations that run through an engine


class EvalEngine(Protocol):
    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: CacheConfig,
        prompts: list[list[int]],
        max_tokens: int,
    ) -> list[str]:
        """Greedy completions of every prompt under `config` (a concrete budget)."""
        ...

    def predictions(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: CacheConfig, ids: list[int]
    ) -> Predictions:
        """`ids` as one prompt fed one token per step: what the compressed cache predicts."""
        ...
