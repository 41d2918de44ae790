"""The second real model, Gemma 3 270M (google/gemma-3-270m, Q4_K_M), installed offline from
the chunk wheels: 5 of every 6 layers see a 512-token window, head dim 256, one KV head for
four query heads. The engine's 16-bit cache gives model.generate's greedy tokens over 1.5k
tokens, and with LogQuant the served path matches LogQuantCache at the same cut points."""

import math

import pytest
import torch

from logquant.data import essays_text
from logquant.eval.configs import parse_spec
from logquant.models import GEMMA3_270M, load_model, resolve_model
from server.engine import LLM, SamplingParams

pytestmark = pytest.mark.gemma3
PROMPT_TOKENS, NEW_TOKENS = 1400, 100  # 1.5k tokens: the windows have moved more than twice
CHUNK = 256  # prefill cut points of both paths in the served-path test


@pytest.fixture(scope="module")
def gemma():
    return load_model(GEMMA3_270M)


def essay_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(essays_text()[: length * 8])
    assert len(ids) >= length
    return ids[:length]


def test_installed_offline_and_shaped_as_expected(gemma) -> None:
    model, _ = gemma
    text = model.config.get_text_config(decoder=True)
    assert (resolve_model("google/gemma-3-270m").directory / "config.json").is_file()
    assert (text.model_type, text.head_dim, text.num_attention_heads, text.num_key_value_heads) == (
        "gemma3_text",
        256,
        4,
        1,
    )
    kinds = [t == "sliding_attention" for t in text.layer_types]
    assert text.sliding_window == 512 and sum(kinds) == 15 and len(kinds) == 18


def test_engine_fp16_equals_generate_over_1500_tokens(gemma) -> None:
    model, tok = gemma
    ids = essay_ids(tok, PROMPT_TOKENS)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    expected = out[0, len(ids) :].tolist()
    previous = model.config._attn_implementation
    try:
        llm = LLM(
            model_object=model,
            tokenizer=tok,
            policy="fp16",
            kv_cache_memory="256MiB",
            debug_integrity=True,
            max_num_batched_tokens=CHUNK,
            max_num_seqs=1,
        )
        assert [g.window for g in llm.engine.layout.groups] == [None] + [512] * 5  # 6 groups of 3 layers
        (result,) = llm.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    finally:
        model.set_attn_implementation(previous)
    assert result.outputs[0].token_ids == expected


def cache_logprobs(model, spec: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[:t + 1]) through LogQuantCache, fed in CHUNK-token chunks."""
    cache = parse_spec(spec).make_cache(model)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            logits = model(input_ids=torch.tensor([ids[start : start + CHUNK]]), cache=cache).logits[0].float()
            rows.append(torch.log_softmax(logits, dim=-1))
    logprobs = torch.cat(rows)[:-1]
    return logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def engine_logprobs(model, tok, spec: str, ids: list[int]) -> torch.Tensor:
    """The same through the engine (prompt log-probs, prefill chunks of CHUNK tokens)."""
    config = parse_spec(spec)
    previous = model.config._attn_implementation
    try:
        llm = LLM(
            model_object=model,
            tokenizer=tok,
            policy=config.policy,
            fp_budget=config.fp_budget or 192,
            group_size=32,
            kv_cache_memory="256MiB",
            max_num_batched_tokens=CHUNK + 1,
            max_num_seqs=1,
            debug_integrity=True,
        )
        assert llm.engine.scheduler.config.prefill_chunk_tokens == CHUNK
        (out,) = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    finally:
        model.set_attn_implementation(previous)
    return torch.tensor([entry["logprob"] for entry in out.prompt_logprobs[1:]])


@pytest.mark.parametrize("spec,tolerance", [("fp16", 1e-3), ("logquant@48", None)])
def test_served_path_matches_logquant_cache(gemma, spec: str, tolerance: float | None) -> None:
    """1200 tokens: the full-attention layers demote 2-bit blocks, the window layers slide.
    With 2-bit blocks, float noise between the two attention kernels can move a value across
    a rounding boundary of the 2-bit grid (see test_served_path.py), so the bound is on
    perplexity; with 16-bit caches the log-probs agree."""
    model, tok = gemma
    ids = essay_ids(tok, 1200)
    cache, engine = cache_logprobs(model, spec, ids), engine_logprobs(model, tok, spec, ids)
    assert len(cache) == len(engine) == len(ids) - 1
    ppl = [math.exp(float(-x.mean())) for x in (cache, engine)]
    assert ppl[1] == pytest.approx(ppl[0], rel=0.01), ppl
    if tolerance is not None:
        torch.testing.assert_close(engine, cache, atol=tolerance, rtol=0)


def test_served_by_name_through_the_api() -> None:
    """`--model gemma-3-270m`: the server loads it by name and answers chat (Gemma 3's
    template) and completions; its KV layout has the window groups."""
    from server_util import RunningServer, openai_client

    from server.engine.config import EngineConfig
    from server.engine.core import EngineCore

    def factory() -> EngineCore:
        config = EngineConfig(
            model=GEMMA3_270M, policy="logquant", kv_cache_memory=256 << 20, device="cpu", max_model_len=4096
        )
        return EngineCore.from_config(config)

    with RunningServer(factory, model=GEMMA3_270M, fp_budget=192, group_size=32) as server:
        client = openai_client(server.wait_ready(), timeout=300)
        assert [g.window for g in server.core.layout.groups] == [None] + [512] * 5
        chat = client.chat.completions.create(
            model=GEMMA3_270M, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Name a colour."}]
        )
        text = client.completions.create(
            model=GEMMA3_270M, prompt="The capital of France is", max_tokens=6, temperature=0
        )
    assert chat.choices[0].message.content and chat.usage.prompt_tokens > 5
    assert text.choices[0].text.startswith(" the capital of") and text.usage.completion_tokens == 6
