"""The engine end to end on tiny random-weight models."""

import pytest
from tiny import byte_tokenizer, tiny_model

from server.engine import LLM, SamplingParams
from server.engine.config import EngineConfig
from server.engine.core import EngineCore

PROMPTS = [
    "hello world, this is a test of the engine",
    "abc",
    "The quick brown fox jumps over the lazy dog again and again",
    "0123456789" * 5,
]


def reference(prompt: str, n: int) -> list[int]:
    model, tok = tiny_model(), byte_tokenizer()  # a separate copy: the engine swaps attention
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def make_engine(policy: str = "fp16", kv: int = 64 << 20, budget: int = 16, fp_budget: int = 48) -> EngineCore:
    config = EngineConfig(
        policy=policy,
        fp_budget=fp_budget,
        group_size=8,
        kv_cache_memory=kv,
        max_num_batched_tokens=budget,
        device="cpu",
        debug_integrity=True,
    )
    return EngineCore(config, tiny_model(), byte_tokenizer())


def run_staggered(engine: EngineCore, max_tokens: int, params: SamplingParams | None = None) -> dict[str, list[int]]:
    """Submit one prompt per step (arrivals at different steps), run until all finish."""
    tok = engine.tokenizer
    params = params or SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs, pending = {}, list(enumerate(PROMPTS))
    while pending or engine.has_work():
        if pending:
            i, prompt = pending.pop(0)
            (seqs[prompt],) = engine.add_request(f"r{i}", tok.encode(prompt), params)
        engine.step()
    assert all(s.is_finished for s in seqs.values())
    return {p: s.output_token_ids for p, s in seqs.items()}


def test_fp16_engine_equals_generate_with_chunking_and_staggered_arrivals() -> None:
    engine = make_engine(budget=16)
    outputs = run_staggered(engine, 24)
    for prompt, tokens in outputs.items():
        assert tokens == reference(prompt, 24), prompt
    assert engine.kv_manager.num_free_pages == engine.kv_manager.num_pages


def test_fp16_engine_equals_generate_under_preemption() -> None:
    layout_page = make_engine().layout.page_bytes_all_layers
    engine = make_engine(kv=10 * layout_page, budget=64)  # 10 pages of 16 tokens for 4 sequences
    outputs = run_staggered(engine, 40)
    assert engine.scheduler.num_preemptions > 0
    for prompt, tokens in outputs.items():
        assert tokens == reference(prompt, 40), prompt


@pytest.mark.parametrize("policy", ["kivi", "logquant"])
def test_quantized_policies_finish_every_request(policy: str) -> None:
    engine = make_engine(policy, budget=32, fp_budget=24)
    outputs = run_staggered(engine, 60)
    assert all(len(t) == 60 for t in outputs.values())
    assert engine.stats.kv_bytes_by_tier == {"fp": 0, "2bit": 0}
    assert engine.kv_manager.num_free_pages == engine.kv_manager.num_pages


def test_quantized_store_holds_2bit_pages_while_running() -> None:
    engine = make_engine("logquant", budget=64, fp_budget=24)
    engine.add_request("a", list(range(3, 200)), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    tiers = engine.stats.kv_bytes_by_tier
    assert tiers["2bit"] > 0 and tiers["fp"] > 0
    assert tiers["fp"] + tiers["2bit"] == engine.layout.bytes_for(engine.kv_manager.num_tokens("a-0"))
    assert engine.stats.kv_fp16_equivalent_bytes > tiers["fp"] + tiers["2bit"]


@pytest.mark.parametrize("policy", ["kivi", "logquant"])
def test_quantized_outputs_unchanged_by_preemption(policy: str) -> None:
    roomy = make_engine(policy, budget=64, fp_budget=24)
    expected = run_staggered(roomy, 40)
    assert roomy.scheduler.num_preemptions == 0
    page = roomy.layout.page_bytes_all_layers
    tight = make_engine(policy, kv=roomy.layout.pages_for(100) * 2 * page, budget=64, fp_budget=24)
    assert run_staggered(tight, 40) == expected
    assert tight.scheduler.num_preemptions > 0


def test_seed_reproducible_across_batch_compositions() -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = make_engine()
    (a,) = alone.add_request("x", alone.tokenizer.encode(PROMPTS[0]), params)
    while alone.has_work():
        alone.step()
    crowded = make_engine(budget=8)
    crowded.add_request("y", crowded.tokenizer.encode(PROMPTS[2]), SamplingParams(max_tokens=20, temperature=1))
    crowded.step()
    (b,) = crowded.add_request("x", crowded.tokenizer.encode(PROMPTS[0]), params)
    while crowded.has_work():
        crowded.step()
    assert a.output_token_ids == b.output_token_ids


def test_n_samples_are_distinct() -> None:
    llm = LLM(model_object=tiny_model(), tokenizer=byte_tokenizer(), policy="fp16", kv_cache_memory="32MiB")
    (out,) = llm.generate(["hello"], SamplingParams(n=4, max_tokens=16, temperature=1.0, seed=3, ignore_eos=True))
    assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4


def test_sampling_params_change_output() -> None:
    llm = LLM(model_object=tiny_model(), tokenizer=byte_tokenizer(), policy="fp16", kv_cache_memory="32MiB")
    greedy = llm.generate(["hello"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0]
    top1 = llm.generate(["hello"], SamplingParams(max_tokens=16, top_k=1, ignore_eos=True))[0].outputs[0]
    assert top1.token_ids == greedy.token_ids  # top_k=1 sampling is greedy
    stop = greedy.token_ids[3]
    stopped = llm.generate(["hello"], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop]))
    assert stopped[0].outputs[0].token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"
    lp = llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))[0]
    first = lp.outputs[0].logprobs[0]
    assert first["top"][0][0] == lp.outputs[0].token_ids[0] and abs(first["top"][0][1] - first["logprob"]) < 1e-6
    assert first["top"][0][1] >= first["top"][1][1]


def test_abort_frees_pages() -> None:
    engine = make_engine()
    engine.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.kv_manager.num_free_pages < engine.kv_manager.num_pages
    engine.abort_request("a", 1)
    assert engine.kv_manager.num_free_pages == engine.kv_manager.num_pages
    assert not engine.has_work()
    engine.step()
    assert not engine.kv_manager.sequences


def test_abort_sample_ends_one_sample_and_updates_stats() -> None:
    engine = make_engine()
    engine.add_request("a", list(range(3, 40)), SamplingParams(n=2, max_tokens=50, temperature=0))
    engine.step()
    assert engine.stats.num_running == 2 and not engine.is_done("a", 2)
    seq = engine.abort_sample("a", 1)
    assert seq is not None and seq.finish_reason == "abort" and engine.abort_sample("a", 1) is None
    assert engine.stats.num_running == 1 and engine.stats.kv_usage == engine.kv_manager.usage > 0
    engine.abort_request("a", 2)
    assert engine.is_done("a", 2) and engine.stats.num_running == 0 and engine.stats.kv_usage == 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3"])
def test_other_architectures_match_generate(arch: str) -> None:
    config = EngineConfig(policy="fp16", kv_cache_memory=32 << 20, max_num_batched_tokens=16, device="cpu")
    engine = EngineCore(config, tiny_model(arch), byte_tokenizer())
    tok = engine.tokenizer
    seqs = [
        engine.add_request(f"r{i}", tok.encode(p), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
        for i, p in enumerate(PROMPTS[:3])
    ]
    while engine.has_work():
        engine.step()
    reference_model = tiny_model(arch)
    for prompt, seq in zip(PROMPTS, seqs):
        ids = tok(prompt, return_tensors="pt")
        out = reference_model.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert seq.output_token_ids == out[0, ids["input_ids"].shape[1] :].tolist(), (arch, prompt)
    logquant = EngineCore(
        EngineConfig(policy="logquant", fp_budget=24, group_size=8, kv_cache_memory=32 << 20, device="cpu"),
        tiny_model(arch),
        byte_tokenizer(),
    )
    (seq,) = logquant.add_request(
        "q", list(range(3, 120)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    while logquant.has_work():
        logquant.step()
    assert len(seq.output_token_ids) == 8


def test_a_failing_row_fails_only_its_request(monkeypatch) -> None:
    """Sampling that raises for one request: its row is retried alone and fails; the other
    requests of the same steps finish with the same tokens as without it."""
    import server.engine.runner as runner_module

    real_sample = runner_module.sample

    def sample_failing_on_seed_13(logits, seqs, masks=None):
        if any(s.params.seed == 13 for s in seqs):
            raise FloatingPointError("poisoned row")
        return real_sample(logits, seqs, masks)

    def run(poison: bool) -> dict[str, object]:
        engine = make_engine(budget=64)
        tok = engine.tokenizer
        seqs = {}
        for i, prompt in enumerate(PROMPTS):
            seed = 13 if poison and i == 1 else None
            params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, seed=seed)
            (seqs[prompt],) = engine.add_request(f"r{i}", tok.encode(prompt), params)
        while engine.has_work():
            engine.step()
        assert engine.kv_manager.num_free_pages == engine.kv_manager.num_pages
        return {p: (s.finish_reason, s.output_token_ids, s.error) for p, s in seqs.items()}

    monkeypatch.setattr(runner_module, "sample", sample_failing_on_seed_13)
    clean, poisoned = run(poison=False), run(poison=True)
    reason, tokens, error = poisoned.pop(PROMPTS[1])
    assert reason == "error" and tokens == [] and "poisoned row" in error
    assert poisoned == {p: v for p, v in clean.items() if p != PROMPTS[1]}
