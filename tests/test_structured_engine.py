"""Structured outputs through the engine: preemption and recompute keep every matcher in step."""

import json

import jsonschema
import pytest
from test_engine import PROMPTS, make_engine
from test_structured import SCHEMAS

from server.engine.request import SamplingParams, StructuredSpec


def run(engine, schemas: list[dict]) -> list[list[int]]:
    tok = engine.tokenizer
    seqs = []
    prompts = [PROMPTS[2], PROMPTS[3], PROMPTS[0] * 2, PROMPTS[2]]  # 50 to 84 tokens each
    for i, (prompt, schema) in enumerate(zip(prompts, schemas)):
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=i, structured=StructuredSpec.json_schema(schema))
        (seq,) = engine.add_request(f"r{i}", tok.encode(prompt), params)
        seqs.append(seq)
        engine.step()  # staggered arrivals
    while engine.has_work():
        engine.step()
    for seq, schema in zip(seqs, schemas):
        assert seq.finish_reason == "stop", tok.decode(seq.output_token_ids)
        jsonschema.validate(json.loads(tok.decode(seq.output_token_ids, skip_special_tokens=True)), schema)
    return [seq.output_token_ids for seq in seqs]


@pytest.mark.parametrize("policy", ["fp16", "logquant"])
def test_structured_outputs_survive_preemption(policy: str) -> None:
    schemas = list(SCHEMAS.values())
    roomy = make_engine(policy, budget=64, fp_budget=24)
    expected = run(roomy, schemas)
    assert roomy.scheduler.num_preemptions == 0
    page = roomy.layout.page_bytes_all_layers
    tight = make_engine(policy, kv=roomy.layout.pages_for(100) * 2 * page, budget=64, fp_budget=24)
    assert run(tight, schemas) == expected
    assert tight.scheduler.num_preemptions > 0


def test_matchers_live_from_add_to_finish() -> None:
    engine = make_engine("fp16", budget=64)
    spec = StructuredSpec.choice(["yes", "no"])
    seqs = engine.add_request("a", engine.tokenizer.encode(PROMPTS[0]), SamplingParams(n=2, structured=spec, seed=0))
    engine.add_request("b", engine.tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=4, ignore_eos=True))
    assert sorted(engine.structured.matchers) == ["a-0", "a-1"]  # created with the request, none for b
    engine.step()
    engine.abort_sample("a", 1)
    assert sorted(engine.structured.matchers) == ["a-0"]  # freed on abort
    while engine.has_work():
        engine.step()
    assert engine.structured.matchers == {} and seqs[0].finish_reason == "stop"
    assert engine.tokenizer.decode(seqs[0].output_token_ids, skip_special_tokens=True) in ("yes", "no")
