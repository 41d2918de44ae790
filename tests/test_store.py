import random

import pytest
import torch

from logquant.attention import attend
from logquant.layout import KVLayout, PagePool
from logquant.policy import make_policy
from logquant.quant import dequantize, quantize
from logquant.store import PagedKVStore

H, KVH, D, LAYERS = 4, 2, 32, 2


def make_store(policy_name: str, budget: int, num_pages: int = 400) -> tuple[PagedKVStore, PagePool]:
    layout = KVLayout(LAYERS, KVH, D, make_policy(policy_name, budget, group_size=8), dtype_bytes=4, group_size=8)
    return PagedKVStore(layout, num_pages, torch.float32, "cpu"), PagePool(num_pages)


def grow(store: PagedKVStore, pool: PagePool, seq: str, n: int) -> None:
    fp, q = store.pages_needed(seq, n)
    store.add_pages(seq, pool.allocate(fp), pool.allocate(q))


def dense_reference(policy_name, budget, keys, values, layout):
    """Keys/values as the policy says they are stored: fp tokens exact, demoted blocks
    quantized once each (keys per channel over the block, values per token)."""
    policy = make_policy(policy_name, budget, group_size=8)
    state = policy.new_state()
    blocks = state.append(keys.shape[0])
    ks, vs = [keys[state.full_precision_positions()]], [values[state.full_precision_positions()]]
    for block in blocks:
        qk = quantize(keys[block], 2, len(block), axis=0, scale_dtype=torch.float16)
        qv = quantize(values[block], 2, 8, axis=-1, scale_dtype=torch.float16)
        ks.append(dequantize(qk))
        vs.append(dequantize(qv))
    return torch.cat(ks), torch.cat(vs)


@pytest.mark.parametrize("policy_name,budget", [("fp16", 0), ("kivi", 16), ("logquant", 12), ("logquant", 30)])
def test_store_attention_equals_dense_reference(policy_name: str, budget: int) -> None:
    gen = torch.Generator().manual_seed(0)
    store, pool = make_store(policy_name, budget)
    store.add_sequence("a")
    total = 0
    all_k = [torch.empty(0, KVH, D) for _ in range(LAYERS)]
    all_v = [torch.empty(0, KVH, D) for _ in range(LAYERS)]
    for chunk in [7, 1, 1, 20, 1, 33, 1, 1, 64, 1, 5]:
        grow(store, pool, "a", chunk)
        plan = store.plan_append("a", chunk)
        for layer in range(LAYERS):
            q = torch.randn(chunk, H, D, generator=gen)
            k = torch.randn(chunk, KVH, D, generator=gen)
            v = torch.randn(chunk, KVH, D, generator=gen)
            out = store.forward(layer, plan, q, k, v, scaling=D**-0.5)
            # reference: what was stored before this chunk, plus the chunk at full precision
            ref_k, ref_v = dense_reference(policy_name, budget, all_k[layer], all_v[layer], store.layout)
            expected = attend(q, torch.cat([ref_k, k]), torch.cat([ref_v, v]), D**-0.5)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            all_k[layer] = torch.cat([all_k[layer], k])
            all_v[layer] = torch.cat([all_v[layer], v])
        total += chunk
    assert store.num_tokens("a") == total


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
    store, pool = make_store(policy_name, budget, num_pages=2000)
    layout, lengths, next_id = store.layout, {}, 0
    for _ in range(300):
        action = rng.random()
        if action < 0.25 or not lengths:
            seq = f"s{next_id}"
            next_id += 1
            store.add_sequence(seq)
            lengths[seq] = 0
        elif action < 0.35:
            seq = rng.choice(sorted(lengths))
            pool.free(store.free_sequence(seq))
            del lengths[seq]
            continue
        seq = rng.choice(sorted(lengths))
        n = rng.choice([1, 1, 2, 9, 40])
        grow(store, pool, seq, n)
        plan = store.plan_append(seq, n)
        for layer in range(LAYERS):
            store.forward(layer, plan, torch.zeros(n, H, D), torch.randn(n, KVH, D), torch.randn(n, KVH, D), 1.0)
        lengths[seq] += n
        used = store.bytes_used()
        assert used["fp"] + used["2bit"] == sum(layout.bytes_for(t) for t in lengths.values())
        assert pool.num_free == 2000 - sum(layout.pages_for(t) for t in lengths.values())
    for seq in list(lengths):
        pool.free(store.free_sequence(seq))
    assert pool.num_free == 2000 and store.bytes_used() == {"fp": 0, "2bit": 0}


def test_layout_capacity_near_physical_limit() -> None:
    """SmolLM2 shape, 16-bit tier: logquant at fp_budget 192 vs fp16 bytes per sequence."""
    fp16 = KVLayout(30, 3, 64, make_policy("fp16"))
    lq = KVLayout(30, 3, 64, make_policy("logquant", 192))
    ratio_2k = fp16.bytes_for(2048) / lq.bytes_for(2048)
    ratio_8k = fp16.bytes_for(8192) / lq.bytes_for(8192)
    assert 3.7 < ratio_2k < 4.2 and 4.7 < ratio_8k < 5.4, (ratio_2k, ratio_8k)
