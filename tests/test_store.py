import random

import pytest
import torch

from logquant.attention import attend
from logquant.kv_manager import KVManager
from logquant.layout import KVLayout
from logquant.policy import make_policy
from logquant.quant import dequantize, quantize
from logquant.store import PagedKVStore

H, KVH, D, LAYERS = 4, 2, 32, 2


def make_store(
    policy_name: str,
    budget: int,
    num_pages: int = 400,
    kv_heads: int = KVH,
    sinks: int = 0,
    kout: int = 0,
    bits: int = 2,
    backend: str = "torch",
) -> tuple[PagedKVStore, KVManager]:
    policy = make_policy(policy_name, budget, group_size=8, sink_tokens=sinks)
    layout = KVLayout(LAYERS, kv_heads, D, policy, dtype_bytes=4, group_size=8, bits=bits, key_fp_channels=kout)
    manager = KVManager(layout, num_pages)
    random.Random(num_pages).shuffle(manager.pool._free)  # non-contiguous, shuffled page ids
    return PagedKVStore(layout, num_pages, torch.float32, "cpu", decode_backend=backend), manager


def dense_reference(policy_name, budget, keys, values, sinks: int = 0, kout: int = 0, bits: int = 2):
    """Keys/values as the policy says they are stored: fp tokens exact, demoted blocks
    quantized once each (keys per channel over the block, values per token); with `kout`,
    each head's `kout` key channels of widest range in a block stay exact up to float16."""
    policy = make_policy(policy_name, budget, group_size=8, sink_tokens=sinks)
    state = policy.new_state()
    blocks = state.append(keys.shape[0])
    ks, vs = [keys[state.full_precision_positions()]], [values[state.full_precision_positions()]]
    for block in blocks:
        block_keys = dequantize(quantize(keys[block], bits, len(block), axis=0, scale_dtype=torch.float16))
        for head in range(keys.shape[1]):
            original = keys[block][:, head]  # [bt, D]
            widest = (original.max(0).values - original.min(0).values).argsort(descending=True)[:kout]
            block_keys[:, head, widest] = original[:, widest].half().float()
        ks.append(block_keys)
        vs.append(dequantize(quantize(values[block], bits, 8, axis=-1, scale_dtype=torch.float16)))
    return torch.cat(ks), torch.cat(vs)


def run_steps(
    policy_name: str,
    budget: int,
    kv_heads: int,
    steps: list[dict[str, int]],
    seed: int,
    backend: str = "torch",
    **variant: int,
) -> None:
    """Run mixed steps (seq -> new tokens) through the manager and the batched store; check
    every layer's output against the per-sequence oracle on the dense reference. `variant`:
    sinks, kout, bits (see `make_store`); `backend`: decodes on `torch` or the `cpu` kernel."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * 3 if kv_heads == 1 else 4 * kv_heads if kv_heads == 2 else 4
    store, manager = make_store(policy_name, budget, kv_heads=kv_heads, backend=backend, **variant)
    store.buffer[: store.num_pages] = 255  # unwritten bytes read as NaN: padding must never touch them
    history: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for chunks in steps:
        for seq, n in chunks.items():
            manager.allocate(seq, (manager.num_tokens(seq) if seq in manager.sequences else 0) + n)
        step = store.prepare(manager.plan_step(list(chunks.items())))
        total = sum(chunks.values())
        for layer in range(LAYERS):
            q = torch.randn(total, heads, D, generator=gen)
            k = torch.randn(total, kv_heads, D, generator=gen)
            v = torch.randn(total, kv_heads, D, generator=gen)
            out = store.forward(layer, step, q, k, v, scaling=D**-0.5)
            row = 0
            for seq, n in chunks.items():
                old_k, old_v = history.get((seq, layer), (torch.empty(0, kv_heads, D), torch.empty(0, kv_heads, D)))
                ref_k, ref_v = dense_reference(policy_name, budget, old_k, old_v, **variant)
                new = slice(row, row + n)
                expected = attend(q[new], torch.cat([ref_k, k[new]]), torch.cat([ref_v, v[new]]), D**-0.5)
                torch.testing.assert_close(out[new], expected, atol=1e-5, rtol=1e-5)
                history[(seq, layer)] = (torch.cat([old_k, k[new]]), torch.cat([old_v, v[new]]))
                row += n
        manager.check_integrity()


MIXED_STEPS = [
    {"a": 7},
    {"a": 1, "b": 20},
    {"a": 1, "b": 1, "c": 33},
    {"c": 1, "a": 1, "b": 64},
    {"a": 40, "b": 1, "c": 1},
    {"b": 1, "a": 1, "c": 1},
    {"c": 5, "a": 1},
]


@pytest.mark.parametrize("policy_name,budget", [("fp16", 0), ("kivi", 16), ("logquant", 12), ("logquant", 30)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_batched_step_equals_per_sequence_reference(policy_name: str, budget: int, kv_heads: int, backend: str) -> None:
    """Decodes, prefill chunks and demotions in the same step; GQA ratios 3, 4 and 1."""
    run_steps(policy_name, budget, kv_heads, MIXED_STEPS, seed=kv_heads, backend=backend)


@pytest.mark.parametrize("policy_name,budget", [("kivi", 16), ("logquant", 12)])
@pytest.mark.parametrize("variant", [{"sinks": 4}, {"kout": 3}, {"bits": 4}, {"bits": 8}, {"sinks": 3, "kout": 2}])
def test_variants_equal_per_sequence_reference(policy_name: str, budget: int, variant: dict[str, int]) -> None:
    """Attention sinks, 16-bit key outlier channels and 4/8-bit codes in the same mixed steps
    (decodes on the CPU kernel where it reads the layout: 2-bit codes)."""
    backend = "cpu" if variant.get("bits", 2) == 2 else "torch"
    run_steps(policy_name, budget, 2, MIXED_STEPS, seed=11, backend=backend, **variant)


@pytest.mark.parametrize("variant", [{}, {"sinks": 4}, {"kout": 4}, {"bits": 4}])
def test_variant_accounting_matches_cost_model(variant: dict[str, int]) -> None:
    store, manager = make_store("logquant", 12, num_pages=200, **variant)
    manager.allocate("a", 90)
    step = store.prepare(manager.plan_step([("a", 90)]))
    for layer in range(LAYERS):
        store.forward(layer, step, torch.zeros(90, H, D), torch.randn(90, KVH, D), torch.randn(90, KVH, D), 1.0)
    used = manager.bytes_by_tier()
    assert used["fp"] + used["2bit"] == store.layout.bytes_for(90)
    base = KVLayout(LAYERS, KVH, D, make_policy("logquant", 12, group_size=8), dtype_bytes=4, group_size=8)
    if "kout" in variant:  # per block and head: kout float16 values per token plus kout channel ids
        bt = base.block_tokens
        assert store.layout.packed_block_bytes - base.packed_block_bytes >= KVH * variant["kout"] * (bt * 2 + 1)


def test_decode_attention_matches_naive_softmax_gqa() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(10, KVH, D, generator=gen, dtype=torch.float64)
    v = torch.randn(10, KVH, D, generator=gen, dtype=torch.float64)
    out = attend(q, k, v, 0.5)
    for head in range(H):
        kv = head // (H // KVH)
        w = torch.softmax(k[:, kv] @ q[0, head] * 0.5, dim=0)
        torch.testing.assert_close(out[0, head], (w[:, None] * v[:, kv]).sum(0), atol=1e-5, rtol=1e-5)


def test_prefill_chunk_is_causal() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, H, D, generator=gen)
    k = torch.randn(6, KVH, D, generator=gen)
    v = torch.randn(6, KVH, D, generator=gen)
    full = attend(q, k, v, 0.3)
    # query i of the chunk sees the 2 cached keys and new keys 0..i
    for i in range(4):
        torch.testing.assert_close(full[i : i + 1], attend(q[i : i + 1], k[: 3 + i], v[: 3 + i], 0.3))


@pytest.mark.parametrize("policy_name,budget", [("fp16", 0), ("kivi", 16), ("logquant", 12)])
def test_accounting_matches_cost_model(policy_name: str, budget: int) -> None:
    rng = random.Random(3)
    store, manager = make_store(policy_name, budget, num_pages=2000)
    layout, lengths, next_id = store.layout, {}, 0
    for _ in range(300):
        action = rng.random()
        if action < 0.25 or not lengths:
            seq = f"s{next_id}"
            next_id += 1
            lengths[seq] = 0
        elif action < 0.35:
            seq = rng.choice(sorted(lengths))
            manager.free(seq)
            del lengths[seq]
            continue
        seq = rng.choice(sorted(lengths))
        n = rng.choice([1, 1, 2, 9, 40])
        manager.allocate(seq, lengths[seq] + n)
        step = store.prepare(manager.plan_step([(seq, n)]))
        for layer in range(LAYERS):
            store.forward(layer, step, torch.zeros(n, H, D), torch.randn(n, KVH, D), torch.randn(n, KVH, D), 1.0)
        lengths[seq] += n
        used = manager.bytes_by_tier()
        assert used["fp"] + used["2bit"] == sum(layout.bytes_for(t) for t in lengths.values())
        assert manager.num_free_pages == 2000 - sum(layout.pages_for(t) for t in lengths.values())
        manager.check_integrity()
    for seq in list(lengths):
        manager.free(seq)
    assert manager.num_free_pages == 2000 and manager.bytes_by_tier() == {"fp": 0, "2bit": 0}


def test_integrity_check_catches_a_double_owned_page() -> None:
    _, manager = make_store("logquant", 12)
    manager.allocate("a", 30)
    manager.plan_step([("a", 30)])
    manager.check_integrity()
    manager.allocate("b", 1)
    manager.plan_step([("b", 1)])
    manager.sequences["b"].groups[0].fp_pages.append(manager.sequences["a"].groups[0].fp_pages[0])
    with pytest.raises(AssertionError, match="owned twice"):
        manager.check_integrity()


def test_layout_capacity_near_physical_limit() -> None:
    """SmolLM2 shape, 16-bit tier: logquant at fp_budget 192 vs fp16 bytes per sequence."""
    fp16 = KVLayout(30, 3, 64, make_policy("fp16"))
    lq = KVLayout(30, 3, 64, make_policy("logquant", 192))
    ratio_2k = fp16.bytes_for(2048) / lq.bytes_for(2048)
    ratio_8k = fp16.bytes_for(8192) / lq.bytes_for(8192)
    assert 3.7 < ratio_2k < 4.2 and 4.7 < ratio_8k < 5.4, (ratio_2k, ratio_8k)
