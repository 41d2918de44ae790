"""The served path (engine) against the library path (`LogQuantCache` under `model.generate`):
both run one `KVManager` and one `PagedKVStore`, so with the same prefill cut points they keep
the same tokens at full precision and quantize the same blocks."""

import sys
from pathlib import Path

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from logquant.hf import LogQuantCache
from server.engine import SamplingParams
from server.engine.config import EngineConfig
from server.engine.core import EngineCore

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # bench/eval_engine.py drives the engine

PROMPTS = ["hello world, this is a test of the engine", "abc", "The quick brown fox jumps over the lazy dog" * 2]
CHUNK = 8  # prefill cut points of both paths: every 8 tokens


def generate_with_cache(prompt: str, policy: str, fp_budget: int, n: int, **variant: int) -> list[int]:
    model, tok = tiny_model(), byte_tokenizer()  # a separate copy: the engine swaps attention
    ids = tok(prompt, return_tensors="pt")
    cache = LogQuantCache(model.config, policy=policy, fp_budget=fp_budget, group_size=8, **variant)
    out = model.generate(
        **ids, past_key_values=cache, max_new_tokens=n, do_sample=False, eos_token_id=None, prefill_chunk_size=CHUNK
    )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def engine_outputs(policy: str, fp_budget: int, n: int, **variant: int) -> dict[str, list[int]]:
    config = EngineConfig(
        policy=policy,
        fp_budget=fp_budget,
        group_size=8,
        kv_cache_memory=64 << 20,
        max_num_batched_tokens=2 * CHUNK,
        max_num_seqs=CHUNK,
        device="cpu",
        debug_integrity=True,
        **variant,
    )
    engine = EngineCore(config, tiny_model(), byte_tokenizer())
    assert engine.scheduler.config.prefill_chunk_tokens == CHUNK
    seqs = {}
    for i, prompt in enumerate(PROMPTS):  # all in flight together: decodes batched with prefill chunks
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        (seqs[prompt],) = engine.add_request(f"r{i}", engine.tokenizer.encode(prompt), params)
    while engine.has_work():
        engine.step()
    return {prompt: seq.output_token_ids for prompt, seq in seqs.items()}


@pytest.mark.parametrize(
    "policy,fp_budget,variant",
    [
        ("kivi", 24, {}),
        ("logquant", 24, {}),
        ("logquant", 12, {}),
        ("kivi", 16, {"sink_tokens": 4, "key_fp_channels": 2}),
        ("logquant", 12, {"kv_bits": 4, "sink_tokens": 2}),
    ],
)
def test_engine_greedy_equals_generate_with_logquant_cache(policy: str, fp_budget: int, variant: dict) -> None:
    """60 new tokens after prompts of 3 to 86 tokens: several blocks are demoted per sequence."""
    outputs = engine_outputs(policy, fp_budget, 60, **variant)
    cache_variant = {("bits" if k == "kv_bits" else k): v for k, v in variant.items()}
    for prompt, tokens in outputs.items():
        assert tokens == generate_with_cache(prompt, policy, fp_budget, 60, **cache_variant), prompt


def test_different_cut_points_change_quantized_outputs() -> None:
    """Why the cut points must match: a prefill chunk attends to the earlier chunks after they
    were demoted, so one 86-token chunk and 8-token chunks quantize different things."""
    prompt = PROMPTS[2]
    model, tok = tiny_model(), byte_tokenizer()
    ids = tok(prompt, return_tensors="pt")

    def logits(chunk: int | None) -> torch.Tensor:
        cache = LogQuantCache(model.config, policy="logquant", fp_budget=12, group_size=8)
        out = model.generate(
            **ids,
            past_key_values=cache,
            max_new_tokens=1,
            do_sample=False,
            prefill_chunk_size=chunk,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return out.logits[0]

    assert not torch.allclose(logits(None), logits(CHUNK), atol=1e-3)


@pytest.mark.real_model
def test_engine_perplexity_matches_cache_on_the_default_model(model_and_tokenizer) -> None:
    """On real text, token by token: the engine (prompt logprobs, chunks of 1) and the cache.
    fp16 agrees to float noise; with 2-bit blocks, float noise (attention kernels differ: the
    engine's flash attention with a log-sum-exp merge, transformers' SDPA for the cache) can
    move a value across a rounding boundary of the 2-bit grid, so the bound is looser."""
    from eval_engine import engine_predictions

    from logquant.eval.configs import parse_spec
    from logquant.eval.modes import text_ids
    from logquant.eval.perplexity import argmax_agreement, decode_predictions, perplexity

    model, tok = model_and_tokenizer
    ids = text_ids(tok, 96)
    for spec, logprob_tolerance in [("fp16", 1e-3), ("kivi@32", None), ("logquant@24", None)]:
        cache = decode_predictions(model, parse_spec(spec), ids)
        engine = engine_predictions(model, tok, parse_spec(spec), ids)
        assert perplexity(engine) == pytest.approx(perplexity(cache), rel=0.01), spec
        assert argmax_agreement(engine, cache) >= 0.97, spec
        if logprob_tolerance is not None:
            torch.testing.assert_close(engine.target_logprobs, cache.target_logprobs, atol=logprob_tolerance, rtol=0)
