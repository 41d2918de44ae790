"""Structured outputs with the default model's tokenizer (49k BPE tokens) and its logits."""

import json

import jsonschema
import pytest
import torch
from test_structured import SCHEMAS, constrained, draw, generate, make_seq
from transformers import DynamicCache

from server.engine.request import SamplingParams, SequenceState, StructuredSpec

pytestmark = pytest.mark.real_model


def test_random_logits_outputs_validate(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    vocab = model.config.vocab_size
    specs = [StructuredSpec.json_schema(schema) for schema in SCHEMAS.values()]
    for seed in range(2):
        seqs = [make_seq(tok, spec, seed, i) for i, spec in enumerate(specs)] + [make_seq(tok, None, seed, 9)]
        texts = generate(tok, seqs, vocab, seed)
        for schema, text, s in zip(SCHEMAS.values(), texts, seqs):
            assert s.output_token_ids[-1] == tok.eos_token_id, text
            jsonschema.validate(json.loads(text), schema)


@torch.inference_mode()
def model_generate(model, tok, prompt: str, params: SamplingParams, max_tokens: int = 80) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
    s = SequenceState("s", "s", 0, list(ids), params, eos_token_ids=(tok.eos_token_id,))
    manager = constrained(tok, [s])
    cache, step_ids = DynamicCache(), torch.tensor([ids])
    for _ in range(max_tokens):
        logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits[:, -1]
        (result,) = draw(manager, logits, [s])
        s.output_token_ids.append(result.token_id)
        if result.token_id == tok.eos_token_id:
            break
        step_ids = torch.tensor([[result.token_id]])
    assert s.output_token_ids[-1] == tok.eos_token_id, tok.decode(s.output_token_ids)
    return tok.decode(s.output_token_ids, skip_special_tokens=True)


def test_model_logits_outputs_validate(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "hobbies": {"type": "array", "items": {"enum": ["chess", "music", "sport"]}, "maxItems": 3},
        },
        "required": ["name", "age", "hobbies"],
        "additionalProperties": False,
    }
    prompt = "Describe a person as JSON with name, age and hobbies."
    settings = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(top_p=0.9, seed=2),
    ]
    for params in settings:
        params.structured = StructuredSpec.json_schema(person)
        jsonschema.validate(json.loads(model_generate(model, tok, prompt, params)), person)
    choices = ["Paris", "London", "Rome", "Berlin is the capital"]
    for seed in range(3):
        choice = SamplingParams(seed=seed, structured=StructuredSpec.choice(choices))
        assert model_generate(model, tok, "What is the capital of France?", choice) in choices
