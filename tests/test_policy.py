import random

import pytest

from logquant.policy import make_policy, sink_tokens_of


def reference_logquant(n: int, w: int) -> tuple[list[int], list[list[int]]]:
    """The rule as the paper states it, one token at a time, written independently."""
    local: list[int] = []
    sparse: list[int] | None = None
    demoted: list[list[int]] = []
    for pos in range(n):
        local.append(pos)
        if len(local) > 2 * w:
            oldest, local = local[:w], local[w:]
            if sparse is None:
                sparse = oldest
            else:
                merged = sparse + oldest
                sparse = merged[0::2]
                demoted.append(merged[1::2])
    return sorted((sparse or []) + local), demoted


@pytest.mark.parametrize("w", [4, 16, 64])
def test_logquant_matches_reference_and_invariants(w: int) -> None:
    policy = make_policy("logquant", fp_budget=3 * w)
    state = policy.new_state()
    seen_demoted: set[int] = set()
    for n in range(1, 3001):
        blocks = state.append(1)
        for block in blocks:
            assert len(block) == w
            assert not seen_demoted & set(block), "a token was demoted twice"
            seen_demoted |= set(block)
        fp = state.full_precision_positions()
        assert len(fp) <= 3 * w
        assert set(range(max(0, n - w), n)) <= set(fp), "newest W must be full precision"
        assert 0 in fp, "token 0 is the implicit sink"
        assert not seen_demoted & set(fp)
        assert seen_demoted | set(fp) == set(range(n)), "every token is in exactly one tier"
        if n % 97 == 0 or n < 300:
            expected_fp, expected_blocks = reference_logquant(n, w)
            assert sorted(fp) == expected_fp
            assert policy.num_blocks(n) == len(expected_blocks)
            assert policy.num_fp_tokens(n) == len(fp)


@pytest.mark.parametrize("name,budget", [("logquant", 12), ("logquant", 192), ("kivi", 64), ("fp16", 0)])
def test_prefill_equals_one_by_one(name: str, budget: int) -> None:
    policy = make_policy(name, fp_budget=budget, group_size=16)
    rng = random.Random(7)
    chunked, single = policy.new_state(), policy.new_state()
    chunked_blocks, single_blocks = [], []
    while chunked.num_tokens < 2500:
        k = rng.choice([1, 3, 17, 100, 511])
        chunked_blocks += chunked.append(k)
        for _ in range(k):
            single_blocks += single.append(1)
        assert chunked.full_precision_positions() == single.full_precision_positions()
        assert chunked_blocks == single_blocks
        assert policy.full_precision_positions(chunked.num_tokens) == chunked.full_precision_positions()


def test_logquant_sparse_set_is_log_distributed() -> None:
    fp = make_policy("logquant", fp_budget=192).full_precision_positions(4096)
    w = 64
    sparse = sorted(fp)[:w]
    assert sparse[0] == 0, "token 0 survives every halving"
    gaps = [b - a for a, b in zip(sparse[1:], sparse[2:])]
    # density ~ 1/distance: strides 64, 32, 32, 16 x4, 8 x8, 4 x16, 2 x31 (newest)
    assert gaps == sorted(gaps, reverse=True), "older sparse tokens are further apart"
    assert gaps[0] == 64 and gaps[-1] == 2 and gaps.count(4) == 16 and gaps.count(8) == 8


def test_kivi_window() -> None:
    policy = make_policy("kivi", fp_budget=128, group_size=32, sink_tokens=0)
    for n in [1, 128, 129, 160, 161, 1000]:
        fp = policy.full_precision_positions(n)
        assert fp == list(range(n - len(fp), n))
        assert len(fp) <= 128 and (n <= 128 or len(fp) > 96)
        assert policy.num_fp_tokens(n) == len(fp)


def test_bad_policies() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("int4")
    with pytest.raises(ValueError, match="fp_budget"):
        make_policy("kivi", fp_budget=8, group_size=32)
    with pytest.raises(ValueError, match="fp_budget"):
        make_policy("logquant", fp_budget=2)
    with pytest.raises(ValueError, match="sink_tokens"):
        make_policy("kivi", fp_budget=64, sink_tokens=-1)


@pytest.mark.parametrize("name,budget", [("kivi", 64), ("logquant", 48)])
def test_sinks_stay_full_precision_and_shift_the_policy(name: str, budget: int) -> None:
    plain = make_policy(name, fp_budget=budget, group_size=16, sink_tokens=0)
    sunk = make_policy(name, fp_budget=budget, group_size=16, sink_tokens=4)
    state, rng, demoted = sunk.new_state(), random.Random(3), []
    while state.num_tokens < 1500:
        demoted += state.append(rng.choice([1, 2, 7, 100]))
        n = state.num_tokens
        fp = state.full_precision_positions()
        assert fp[: min(n, 4)] == list(range(min(n, 4))), "the first 4 tokens never leave full precision"
        assert fp[min(n, 4) :] == [p + 4 for p in plain.full_precision_positions(max(0, n - 4))]
        assert sorted(fp + [p for block in demoted for p in block]) == list(range(n))
        assert sunk.num_fp_tokens(n) == len(fp) <= sunk.peak_fp_tokens(n)
    assert sunk.max_fp_tokens == plain.max_fp_tokens + 4 and sunk.name == name


def test_window_divisor_sets_logquant_window() -> None:
    assert make_policy("logquant", 192).window == 64
    wide = make_policy("logquant", 192, window_divisor=2.5)
    assert wide.window == 76 and wide.block_tokens == 76 and wide.max_fp_tokens == 228
    with pytest.raises(ValueError, match="window"):
        make_policy("logquant", 4, window_divisor=5)


def test_default_sinks_per_policy() -> None:
    """KIVI keeps 4 sink tokens by default (they won at equal bytes); LogQuant keeps token 0
    by construction and no extra sinks."""
    assert sink_tokens_of(make_policy("kivi", 128)) == 4
    fp = make_policy("kivi", 128).full_precision_positions(1000)
    assert fp[:4] == [0, 1, 2, 3] and fp[4:] == list(range(900, 1000))
    assert sink_tokens_of(make_policy("logquant", 192)) == 0 and sink_tokens_of(make_policy("fp16")) == 0
    assert sink_tokens_of(make_policy("kivi", 128, sink_tokens=0)) == 0
