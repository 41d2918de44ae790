"""logit_bias, min_tokens and stop_token_ids: validation and effect (issue 12 item 3)."""

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from server.engine import LLM
from server.engine.request import SamplingParams, SamplingParamsError, SequenceState
from server.engine.sampler import sample

EOS = 7


def seq(params: SamplingParams, output=()) -> SequenceState:
    return SequenceState("s", "s", 0, [1, 2], params, eos_token_ids=(EOS,), output_token_ids=list(output))


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101.0}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": {5: float("inf")}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
        ({"stop_token_ids": [3, -2]}, "stop_token_ids"),
    ],
)
def test_invalid_fields_name_the_param(fields: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**fields).validate()
    assert info.value.param == param


def test_valid_bounds_pass() -> None:
    params = SamplingParams(logit_bias={0: -100.0, 5: 100, 9: 5e-324}, min_tokens=16, max_tokens=16, stop_token_ids=[0])
    params.validate()


def test_logit_bias_moves_the_pick_per_row() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]] * 3)
    seqs = [
        seq(SamplingParams(temperature=0, logit_bias={2: 100.0})),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=0, logit_bias={0: -100.0, 3: 1.5})),
    ]
    assert [r.token_id for r in sample(logits, seqs)] == [2, 0, 3]
    banned = seq(SamplingParams(logit_bias={0: -100.0, 1: -100.0}, seed=1))
    assert all(sample(logits[:1], [banned])[0].token_id in (2, 3) for _ in range(20))


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0]])  # EOS (7) is the best, then stop id 3
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert sample(logits, [seq(params, output=[5])])[0].token_id not in (EOS, 3)
    assert sample(logits, [seq(params, output=[5, 5])])[0].token_id == EOS
    ignore = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert sample(logits, [seq(ignore, output=[5])])[0].token_id == EOS  # EOS is no stop: not masked
    sampled = SamplingParams(min_tokens=3, stop_token_ids=[3], seed=0)
    assert all(sample(logits, [seq(sampled, output=[])])[0].token_id not in (EOS, 3) for _ in range(20))


def test_min_tokens_leaves_a_candidate_when_only_stop_tokens_remain() -> None:
    logits = torch.tensor([[float("-inf")] * 7 + [0.0]])  # e.g. a finished grammar: only EOS allowed
    assert sample(logits, [seq(SamplingParams(temperature=0, min_tokens=4))])[0].token_id == EOS


def test_engine_min_tokens_and_logit_bias() -> None:
    llm = LLM(model_object=tiny_model(), tokenizer=byte_tokenizer(), policy="fp16", kv_cache_memory="32MiB")
    greedy = llm.generate(["hello"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = greedy.token_ids[1]
    (out,) = llm.generate(["hello"], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop], min_tokens=5))
    tokens = out.outputs[0].token_ids
    assert stop not in tokens[:5]
    if out.outputs[0].finish_reason == "stop":
        assert len(tokens) >= 6 and tokens[-1] == stop
    else:
        assert len(tokens) == 12
    forced = greedy.token_ids[0] + 1
    biased = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={forced: 100.0})
    (out,) = llm.generate(["hello"], biased)
    assert out.outputs[0].token_ids == [forced] * 4
