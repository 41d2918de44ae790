"""The sampler never produces inf/nan nor raises for schema-valid settings (issue 13 item 1):
settings at their validation bounds and at subnormal values, logits of any finite magnitude."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.request import GREEDY_TEMPERATURE, SamplingParams, SequenceState
from server.engine.sampler import process_logits, sample

SUBNORMAL = [5e-324, 1e-310, 1e-46, 1e-45, 1e-40, 1e-38]
FLOAT32_MAX = 3.4028234663852886e38


def seq(params: SamplingParams, output=(3, 3, 1), prompt=(1, 2, 3)) -> SequenceState:
    return SequenceState("s", "s", 0, list(prompt), params, eos_token_ids=(0,), output_token_ids=list(output))


def test_subnormal_temperature_is_greedy() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    for temperature in [5e-324, 1e-310, 1e-46, 1e-9, GREEDY_TEMPERATURE / 2]:
        assert SamplingParams(temperature=temperature).greedy
        assert all(sample(logits, [seq(SamplingParams(temperature=temperature))])[0].token_id == 1 for _ in range(5))
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


def test_tiny_top_p_keeps_the_best_token() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]] * 3)
    seqs = [seq(SamplingParams(top_p=top_p, top_k=k)) for top_p, k in [(1e-46, 0), (5e-324, 2), (1e-38, 0)]]
    for _ in range(5):
        assert [r.token_id for r in sample(logits, seqs)] == [1, 1, 1]


def test_tiny_repetition_penalty_with_large_logits() -> None:
    # seen tokens 1, 2, 3 have positive logits: divided by 1e-38 they would overflow to inf
    logits = torch.tensor([[0.0, 5.0, 40.0, 1e30, -7.0, 2.0]])
    for penalty in [1e-38, 1e-46, 5e-324]:
        for temperature in [1.0, 2.0, 1e-5]:
            params = SamplingParams(repetition_penalty=penalty, temperature=temperature, logprobs=2)
            (r,) = sample(logits, [seq(params)])
            assert r.token_id in (1, 2, 3) and math.isfinite(r.logprob)
            processed = process_logits(logits, [seq(params)])
            assert not processed.isnan().any() and not processed.isposinf().any()


def test_large_penalty_on_every_token_keeps_a_candidate() -> None:
    logits = torch.full((1, 6), -FLOAT32_MAX)  # times 10 would overflow to -inf for every token
    params = SamplingParams(repetition_penalty=10.0, frequency_penalty=2.0, logit_bias={0: -100.0})
    (r,) = sample(logits, [seq(params, output=(0, 4, 5), prompt=(1, 2, 3))])
    assert 0 <= r.token_id < 6
    assert process_logits(logits, [seq(params, output=(0, 4, 5), prompt=(1, 2, 3))]).isfinite().all()


def test_one_extreme_row_does_not_disturb_its_neighbours() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    normal = [seq(SamplingParams(seed=7)), seq(SamplingParams(temperature=0))]
    alone = [r.token_id for r in sample(logits[:2], normal)]
    extreme = [seq(SamplingParams(temperature=5e-324)), seq(SamplingParams(top_p=1e-46, repetition_penalty=1e-38))]
    together = [r.token_id for r in sample(logits, normal + extreme)]
    assert together[:2] == alone


def floats_at(bounds: list[float], low: float, high: float, exclude_low: bool = False) -> st.SearchStrategy[float]:
    inner = st.floats(min_value=low, max_value=high, exclude_min=exclude_low, allow_nan=False)
    return st.one_of(st.sampled_from(bounds), inner)


def params_strategy(vocab: int) -> st.SearchStrategy[SamplingParams]:
    penalty = floats_at([-2.0, 2.0, 0.0, *SUBNORMAL, *(-x for x in SUBNORMAL)], -2.0, 2.0)
    token = st.integers(min_value=0, max_value=vocab - 1)
    return st.builds(
        SamplingParams,
        max_tokens=st.just(8),
        temperature=floats_at([0.0, 2.0, GREEDY_TEMPERATURE, *SUBNORMAL], 0.0, 2.0),
        top_p=floats_at([1.0, *SUBNORMAL], 0.0, 1.0, exclude_low=True),
        top_k=st.sampled_from([-1, 0, 1, 2, vocab - 1, vocab, vocab + 1, 2**31 - 1]),
        min_p=floats_at([0.0, 1.0, *SUBNORMAL], 0.0, 1.0),
        presence_penalty=penalty,
        frequency_penalty=penalty,
        repetition_penalty=floats_at([10.0, 1.0, *SUBNORMAL], 0.0, 10.0, exclude_low=True),
        seed=st.one_of(st.none(), st.sampled_from([-(2**63), 2**63 - 1, 0])),
        logprobs=st.one_of(st.none(), st.sampled_from([0, 1, 20])),
        logit_bias=st.dictionaries(token, floats_at([-100.0, 100.0, *SUBNORMAL], -100.0, 100.0), max_size=3),
        min_tokens=st.integers(min_value=0, max_value=8),
        stop_token_ids=st.lists(token, max_size=2),
        ignore_eos=st.booleans(),
    )


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, list[SequenceState]]:
    vocab = draw(st.integers(min_value=21, max_value=40))
    rows = draw(st.integers(min_value=1, max_value=5))
    extreme = st.sampled_from([0.0, FLOAT32_MAX, -FLOAT32_MAX, 1e38, -1e38, 1e-45, -1e-45])
    element = st.one_of(extreme, st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX, width=32))
    row = st.lists(element, min_size=vocab, max_size=vocab)
    logits = torch.tensor(draw(st.lists(row, min_size=rows, max_size=rows)))
    seqs = []
    for _ in range(rows):
        params = draw(params_strategy(vocab))
        params.validate()  # every setting drawn is one the API accepts
        tokens = st.lists(st.integers(min_value=0, max_value=vocab - 1), max_size=3 * vocab)
        seqs.append(seq(params, output=draw(tokens), prompt=draw(tokens) or [0]))
    return logits, seqs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_any_valid_settings_and_logits_give_a_valid_token(batch: tuple[torch.Tensor, list[SequenceState]]) -> None:
    logits, seqs = batch
    results = sample(logits, seqs)
    processed = process_logits(logits.float(), seqs)
    assert not processed.isnan().any() and not processed.isposinf().any()
    for result, s, row in zip(results, seqs, processed):
        assert 0 <= result.token_id < logits.shape[1]
        assert row[result.token_id] > float("-inf")  # never a masked token
        if s.params.greedy:
            assert result.token_id == int(row.argmax())
        if s.params.logprobs is not None:
            assert math.isfinite(result.logprob) and len(result.top_logprobs) == s.params.logprobs
            assert all(math.isfinite(v) for _, v in result.top_logprobs)
