"""Offline API for scripts and benchmarks:

from server.engine import LLM, SamplingParams
llm = LLM(model="SmolLM2-135M-Instruct", policy="logquant", fp_budget=192, kv_cache_memory="256MiB")
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.engine.config import EngineConfig, parse_bytes
from server.engine.core import EngineCore
from server.engine.request import SamplingParams, SequenceState


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict]


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict | None] | None = None  # with SamplingParams.prompt_logprobs: None, then one per token


class LLM:
    def __init__(
        self,
        model: str = "SmolLM2-135M-Instruct",
        *,
        model_object: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        kv_cache_memory: str | int | None = None,
        **config: object,
    ) -> None:
        kv_bytes = parse_bytes(kv_cache_memory) if kv_cache_memory is not None else None
        engine_config = EngineConfig(model=model, kv_cache_memory=kv_bytes, **config)  # type: ignore[arg-type]
        if model_object is not None:
            assert tokenizer is not None, "model_object needs its tokenizer"
            self.engine = EngineCore(engine_config, model_object, tokenizer)
        else:
            self.engine = EngineCore.from_config(engine_config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None, progress: bool = False
    ) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs in prompt order."""
        params = params or SamplingParams()
        requests: list[tuple[str, list[int], list[SequenceState]]] = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"llm-{next(self._ids)}"
            requests.append((request_id, ids, self.engine.add_request(request_id, ids, params)))
        total = sum(len(seqs) for _, _, seqs in requests)
        with tqdm(total=total, disable=not progress, desc="generate") as bar:
            while self.engine.has_work():
                bar.update(sum(1 for s in self.engine.step().sequences if s.is_finished))
        return [
            RequestOutput(rid, ids, [self._completion(s) for s in seqs], _prompt_logprobs(seqs[0]))
            for rid, ids, seqs in requests
        ]

    def _completion(self, seq: SequenceState) -> CompletionOutput:
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        return CompletionOutput(seq.index, text, list(seq.output_token_ids), seq.finish_reason, seq.output_logprobs)


def _prompt_logprobs(seq: SequenceState) -> list[dict | None] | None:
    if seq.params.prompt_logprobs is None:
        return None
    return [None, *seq.prompt_logprobs]
