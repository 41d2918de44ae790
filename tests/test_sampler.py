import torch

from server.engine.request import SamplingParams, Sequence
from server.engine.sampler import apply_penalties, sample


def seq(params: SamplingParams, prompt=(0, 1), output=(2, 2, 3)) -> Sequence:
    return Sequence("s", "s", 0, list(prompt), params, output_token_ids=list(output))


def test_penalties_exact() -> None:
    logits = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0])
    out = apply_penalties(logits, seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)))
    # token 2 seen twice, token 3 once in the output; prompt tokens are not penalized
    assert out.tolist() == [1.0, -1.0, 2.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 0.0]
    out = apply_penalties(logits, seq(SamplingParams(repetition_penalty=2.0)))
    # HF rule over prompt + output: positive logits divided, negative multiplied
    assert out.tolist() == [0.5, -2.0, 1.0, 0.25, 0.0]


def test_filters() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = lambda p: {sample(logits[None], [seq(SamplingParams(seed=i, **p), output=())])[0].token_id for i in range(200)}
    assert draws({"top_k": 2}) == {0, 1}
    assert draws({"top_p": 0.7}) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draws({"min_p": 0.5}) == {0, 1}  # keeps p >= 0.25
    assert draws({}) == {0, 1, 2, 3}
    assert draws({"temperature": 0.0}) == {0}


def test_seed_determines_draw() -> None:
    logits = torch.zeros(1, 50)
    a = [sample(logits, [seq(SamplingParams(seed=9), output=())])[0].token_id for _ in range(3)]
    assert len(set(a)) == 1
