"""Sliding-window and hybrid models (issue 20): tiny random-weight Qwen2 with sliding layers,
Mistral with a small window, Gemma 2 (softcap), Gemma 3 and gpt-oss (sinks). The engine's
fp16 greedy output equals `model.generate` past twice the window, under preemption, with the
KV manager's invariants checked after every step; the 2-bit policies run and free every
page; `LogQuantCache` matches DynamicCache; what we cannot run is refused in one line."""

import pytest
import torch
from tiny import WINDOW, WINDOW_ARCHS, byte_tokenizer, tiny_model
from transformers import AutoConfig, DynamicCache

from logquant import LogQuantCache
from logquant.attention_spec import UnsupportedModelError, attention_spec
from server.engine import SamplingParams
from server.engine.config import EngineConfig
from server.engine.core import EngineCore

PROMPTS = [
    "hello world, this is a test of the engine",
    "abc",
    "The quick brown fox jumps over the lazy dog again",
    "0123456789" * 4,
]
NEW_TOKENS = 40  # prompts of 3 to 49 tokens: every sequence ends past twice its window
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def reference(arch: str, prompt: str, n: int) -> list[int]:
    model, tok = tiny_model(arch), byte_tokenizer()  # a separate copy: the engine swaps attention
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def make_engine(
    arch: str, policy: str = "fp16", tight: bool = False, backend: str = "auto", fp_budget: int = 24
) -> EngineCore:
    """`tight`: pages for one and a half of the longest sequences, so four in flight preempt."""
    config = EngineConfig(
        policy=policy,
        fp_budget=fp_budget,
        group_size=8,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        device="cpu",
        debug_integrity=True,
        decode_backend=backend,
        kv_cache_memory=64 << 20,
    )
    if tight:
        layout = EngineCore(config, tiny_model(arch), byte_tokenizer()).layout
        longest = layout.pages_for(max(map(len, PROMPTS)) + NEW_TOKENS)
        pages = max(longest * 3 // 2, longest + 1)
        config = EngineConfig(**{**config.__dict__, "kv_cache_memory": pages * layout.page_bytes_all_layers})
    return EngineCore(config, tiny_model(arch), byte_tokenizer())


def run_all(engine: EngineCore, n: int = NEW_TOKENS) -> dict[str, list[int]]:
    """One prompt arrives per step; run until all finish (integrity is checked every step)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    seqs, pending = {}, list(enumerate(PROMPTS))
    while pending or engine.has_work():
        if pending:
            i, prompt = pending.pop(0)
            (seqs[prompt],) = engine.add_request(f"r{i}", engine.tokenizer.encode(prompt), params)
        engine.step()
    assert engine.kv_manager.num_free_pages == engine.kv_manager.num_pages, "every page is free at the end"
    return {p: s.output_token_ids for p, s in seqs.items()}


def test_layouts_have_a_window_group() -> None:
    for arch in WINDOW_ARCHS:
        engine = make_engine(arch)
        window = engine.model.config.sliding_window
        assert 2 * window <= min(map(len, PROMPTS)) + NEW_TOKENS
        windows = [g.window for g in engine.layout.groups]
        assert window in windows, arch
        assert engine.layout.groups[windows.index(window)].policy.max_fp_tokens == window - 1


@pytest.mark.parametrize("arch", sorted(WINDOW_ARCHS))
def test_fp16_engine_equals_generate_past_the_window_under_preemption(arch: str) -> None:
    engine = make_engine(arch, tight=True)
    backend = engine.store.decode_backend
    assert backend == ("torch" if arch in ("gemma2", "gpt_oss") else "cpu"), "softcap and sinks run on the torch path"
    outputs = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for prompt, tokens in outputs.items():
        assert tokens == reference(arch, prompt, NEW_TOKENS), prompt


def test_window_on_the_torch_decode_path() -> None:
    outputs = run_all(make_engine("gemma3", backend="torch"))
    for prompt, tokens in outputs.items():
        assert tokens == reference("gemma3", prompt, NEW_TOKENS), prompt


@pytest.mark.parametrize("arch", sorted(WINDOW_ARCHS))
@pytest.mark.parametrize("policy", ["kivi", "logquant"])
def test_quantized_policies_run_and_free_every_page(arch: str, policy: str) -> None:
    engine = make_engine(arch, policy, fp_budget=12)
    engine.add_request("long", list(range(3, 80)), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    held = []
    while engine.has_work():
        engine.step()
        held.append(engine.kv_manager.bytes_by_tier())
    full = [g for g in engine.layout.groups if g.window is None]
    assert any(h["2bit"] > 0 for h in held) == bool(full), "full-attention layers demote; window layers never do"
    assert engine.kv_manager.num_free_pages == engine.kv_manager.num_pages


def test_window_pages_stop_growing() -> None:
    """A window group holds ceil((W - 1) / tokens per page) pages however long the sequence."""
    engine = make_engine("mistral_sliding", "logquant", fp_budget=12)
    engine.add_request("a", list(range(3, 100)), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    (group,) = engine.layout.groups
    window = engine.model.config.sliding_window
    counts = []
    while engine.has_work():
        engine.step()
        seq = engine.kv_manager.sequences.get("a-0")
        if seq is not None:
            counts.append(len(seq.pages))
    assert max(counts) == -(-(window - 1) // group.fp_page_tokens) == counts[-1] > 1


@pytest.mark.parametrize("arch", sorted(WINDOW_ARCHS))
def test_logquant_cache_fp16_equals_dynamic_cache(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    tok.padding_side = "left"
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    expected = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kwargs)
    got = model.generate(**inputs, past_key_values=LogQuantCache(model.config, policy="fp16"), **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2_sliding"])
def test_logquant_cache_2bit_keeps_the_window(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    cache = LogQuantCache(model.config, policy="logquant", fp_budget=12, group_size=8)
    ids = tok(PROMPTS[3], return_tensors="pt")
    model.generate(**ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    manager = cache.shared.manager
    manager.check_integrity()
    (seq,) = manager.sequences.values()
    total = manager.num_tokens("row0")
    for group, table in zip(cache.shared.layout.groups, seq.groups):
        if group.window is None:
            assert len(table.packed_pages) > 0
        else:
            assert list(table.slot_of) == list(range(total - WINDOW + 1, total))


@pytest.mark.parametrize(
    "model_type,fields,feature",
    [
        ("t5", {}, "an encoder-decoder model"),
        ("deepseek_v3", {}, "multi-latent attention (MLA)"),
        ("qwen3_next", {}, "linear attention layers"),
        ("jamba", {}, "state-space / linear attention layers"),
        ("mamba", {}, "state-space layers"),
        ("llama4_text", {}, "chunked attention"),
        ("mllama", {}, "cross-attention layers"),
        ("gemma3", {}, "a vision-language model"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional attention"),
        ("gpt2", {}, "not an architecture we run and test"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(model_type: str, fields: dict, feature: str) -> None:
    with pytest.raises(UnsupportedModelError) as refused:
        attention_spec(AutoConfig.for_model(model_type, **fields))
    message = str(refused.value)
    assert message.startswith(f"model type {model_type!r} is not supported: {feature}") and "\n" not in message


def test_server_refuses_an_unsupported_model_at_start_up(tmp_path) -> None:
    """From the config alone, before any weight loads: exit 1 and one line on stderr."""
    import os
    import subprocess
    import sys

    AutoConfig.for_model("deepseek_v3", num_hidden_layers=2).save_pretrained(tmp_path)
    env = {**os.environ, "LOGQUANT_PORT": "0", "LOGQUANT_DEVICE": "cpu", "LOGQUANT_MODEL": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "server.cli"], env=env, capture_output=True, text=True, timeout=180)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1
    assert last == "logquant-serve: error: model type 'deepseek_v3' is not supported: multi-latent attention (MLA)"
