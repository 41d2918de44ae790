"""The batched sampler against a simple per-row reference implementation."""

from collections import Counter

import pytest
import torch

from server.engine.request import SamplingParams, SequenceState
from server.engine.sampler import LOGPROB_FLOOR, _seeded_uniform, apply_penalties, sample


def seq(params: SamplingParams, prompt=(0, 1), output=(2, 2, 3), index: int = 0, eos=()) -> SequenceState:
    return SequenceState("s", "s", index, list(prompt), params, eos_token_ids=tuple(eos), output_token_ids=list(output))


def reference_token(logits: torch.Tensor, s: SequenceState, uniform: float) -> int:
    """One row, written the plain way (sort the whole vocabulary, loops over tokens)."""
    p, x = s.params, logits.float().clone()
    if p.repetition_penalty != 1.0:
        for t in set(s.token_ids()):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(s.output_token_ids).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    for t, bias in p.logit_bias.items():
        x[t] += bias
    if len(s.output_token_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | set(() if p.ignore_eos else s.eos_token_ids):
            x[t] = float("-inf")
    if p.temperature == 0.0:
        return int(torch.argmax(x))
    scaled = (x - x.max()) / p.temperature
    probs = torch.softmax(scaled, dim=-1)
    keep = probs >= p.min_p * probs.max()
    if p.top_k > 0:
        keep &= scaled >= torch.sort(scaled, descending=True).values[p.top_k - 1]
    if p.top_p < 1.0:
        in_k = torch.softmax(scaled.masked_fill(~(scaled >= _kth(scaled, p.top_k)), float("-inf")), dim=-1)
        sorted_probs, order = torch.sort(in_k, descending=True, stable=True)
        kept = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
        kept[0] = True
        keep[order[~kept]] = False
    cdf = torch.cumsum((scaled.exp() * keep).double(), dim=-1)
    return int(torch.searchsorted(cdf, uniform * cdf[-1], right=True))


def _kth(scaled: torch.Tensor, top_k: int) -> float:
    return float(torch.sort(scaled, descending=True).values[top_k - 1]) if top_k > 0 else float("-inf")


def mixed_batch(vocab: int, rng: torch.Generator) -> list[SequenceState]:
    """Greedy, plain, seeded, filtered and penalized rows in one batch."""
    out = lambda n: torch.randint(0, vocab, (n,), generator=rng).tolist()  # noqa: E731
    settings = [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5),
        dict(temperature=1.0),
        dict(temperature=0.7, seed=11),
        dict(temperature=1.2, top_k=5, seed=3),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.0, top_p=0.5, top_k=40, seed=5),
        dict(temperature=1.5, min_p=0.1),
        dict(temperature=1.0, frequency_penalty=1.5, presence_penalty=-0.5, repetition_penalty=0.8, seed=8),
        dict(temperature=0.8, logit_bias={1: 5.0, 2: -100.0}, top_p=0.95),
        dict(temperature=1.0, min_tokens=10, stop_token_ids=[4, 5], top_k=3),
        dict(temperature=0.5, top_p=0.3, min_p=0.2, repetition_penalty=2.0),
    ]
    return [
        seq(
            SamplingParams(**kw),
            prompt=out(5),
            output=out(int(torch.randint(0, 8, (1,), generator=rng))),
            index=i % 3,
            eos=(6,),
        )
        for i, kw in enumerate(settings)
    ]


@pytest.mark.parametrize("vocab", [64, 3000])
def test_batched_equals_per_row_reference(vocab: int) -> None:
    rng = torch.Generator().manual_seed(vocab)
    for trial in range(15):
        seqs = mixed_batch(vocab, rng)
        logits = torch.randn(len(seqs), vocab, generator=rng) * (1 + trial % 4)
        torch.manual_seed(trial)
        got = [r.token_id for r in sample(logits, seqs)]
        sampled = [s for s in seqs if s.params.temperature > 0]
        torch.manual_seed(trial)  # the sampler draws one uniform per sampled row, in order
        drawn = torch.rand(len(sampled), dtype=torch.float64).tolist()
        uniforms = {id(s): _seeded_uniform(s) if s.params.seed is not None else u for s, u in zip(sampled, drawn)}
        expected = [reference_token(row, s, uniforms.get(id(s), 0.0)) for row, s in zip(logits, seqs)]
        assert got == expected, trial


def test_top_p_with_a_nucleus_wider_than_the_candidates() -> None:
    vocab = 5000  # flat: the nucleus of top_p=0.99 holds ~4950 tokens, past every candidate size
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 0.1
    seqs = [seq(SamplingParams(top_p=0.99, seed=i)) for i in range(3)]
    got = [r.token_id for r in sample(logits, seqs)]
    assert got == [reference_token(row, s, _seeded_uniform(s)) for row, s in zip(logits, seqs)]


def test_penalties_exact() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0]] * 2)
    out = apply_penalties(
        logits,
        [
            seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)),
            seq(SamplingParams(repetition_penalty=2.0)),
        ],
    )
    # row 0: token 2 seen twice, token 3 once in the output; prompt tokens are not penalized
    assert out[0].tolist() == [1.0, -1.0, 2.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 0.0]
    # row 1: HF rule over prompt + output: positive logits divided, negative multiplied
    assert out[1].tolist() == [0.5, -2.0, 1.0, 0.25, 0.0]
    assert logits[0].tolist() == [1.0, -1.0, 2.0, 0.5, 0.0]  # the input is not modified


def test_filters() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def draws(fields: dict) -> set[int]:
        return {
            sample(logits[None], [seq(SamplingParams(seed=i, **fields), output=())])[0].token_id for i in range(200)
        }

    assert draws({"top_k": 2}) == {0, 1}
    assert draws({"top_p": 0.7}) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draws({"min_p": 0.5}) == {0, 1}  # keeps p >= 0.25
    assert draws({}) == {0, 1, 2, 3}
    assert draws({"temperature": 0.0}) == {0}


def test_unseeded_draws_follow_the_distribution() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    seqs = [seq(SamplingParams(), output=()) for _ in range(rows)]
    tokens = [r.token_id for r in sample(torch.log(probs).expand(rows, 4), seqs)]
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / rows
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    alone = sample(logits[2:3], [seq(SamplingParams(seed=9), output=())])[0].token_id
    crowd = [
        seq(SamplingParams()),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(seed=9), output=()),
        seq(SamplingParams(top_p=0.5, seed=2)),
    ]
    for _ in range(3):
        assert sample(logits, crowd)[2].token_id == alone
    reordered = sample(logits[[2, 0]], [crowd[2], crowd[0]])[0].token_id
    assert reordered == alone
    # another sample index or output length is another draw (the uniform differs)
    other = seq(SamplingParams(seed=9), output=(), index=1)
    assert _seeded_uniform(other) != _seeded_uniform(crowd[2])


def test_logprobs_only_for_rows_that_ask() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 5.0]])
    seqs = [
        seq(SamplingParams(temperature=0, logprobs=2)),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=0, logprobs=0)),
    ]
    results = sample(logits, seqs)
    expected = torch.log_softmax(logits, dim=-1)
    assert [r.token_id for r in results] == [0, 1, 3]
    assert results[0].logprob == pytest.approx(float(expected[0, 0]))
    assert [t for t, _ in results[0].top_logprobs] == [0, 1]
    assert results[0].top_logprobs[1][1] == pytest.approx(float(expected[0, 1]))
    assert results[1].logprob is None and results[1].top_logprobs is None
    assert results[2].logprob == pytest.approx(float(expected[2, 3])) and results[2].top_logprobs == []


def test_logprob_is_floored_to_stay_finite() -> None:
    logits = torch.tensor([[3e38, -3e38]])  # token 1's raw logprob is -inf; min_tokens forbids EOS token 0
    s = seq(SamplingParams(temperature=0, logprobs=1, min_tokens=1), output=(), eos=(0,))
    (r,) = sample(logits, [s])
    assert r.token_id == 1 and r.logprob == LOGPROB_FLOOR and r.top_logprobs == [(0, 0.0)]
