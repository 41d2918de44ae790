"""Structured outputs in the sampler (issue 12 item 1, engine side): with random logits, every
constrained output parses and validates; constrained and free rows share a call. The matchers
live in the core's `StructuredOutputManager`, wired by hand here: one matcher per sequence,
and the masks of each call handed to the sampler."""

import json
import re

import jsonschema
import pytest
import torch
from tiny import byte_tokenizer

from server.engine.request import SamplingParams, SequenceState, StructuredSpec
from server.engine.sampler import sample
from server.engine.structured import StructuredSpecError, compile_structured
from server.engine.structured_outputs import StructuredOutputManager

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "ok": {"type": "boolean"},
        },
        "required": ["age", "score", "ok"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "kind": {"enum": ["a", "b", None]}},
            "required": ["id", "kind"],
            "additionalProperties": False,
        },
        "maxItems": 3,
    },
}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def make_seq(tok, spec: StructuredSpec | None, seed: int, index: int = 0) -> SequenceState:
    params = SamplingParams(max_tokens=400, seed=seed, structured=spec, temperature=1.0)
    return SequenceState(f"s{seed}-{index}", "r", index, [5, 6], params, eos_token_ids=(tok.eos_token_id,))


def constrained(tok, seqs: list[SequenceState]) -> StructuredOutputManager:
    """A manager holding a matcher for each constrained sequence of `seqs`, as the core adds them."""
    manager = StructuredOutputManager(tok)
    for s in seqs:
        manager.add([s], manager.new_matchers(s.params, 1))
    return manager


def draw(manager: StructuredOutputManager, logits: torch.Tensor, seqs: list[SequenceState]):
    return sample(logits, seqs, manager.grammar_masks(seqs, logits.shape[1]))


def generate(tok, seqs: list[SequenceState], vocab: int, seed: int, favoured: str = "") -> list[str]:
    """Sample all rows together with random logits until each emits EOS or hits max_tokens
    (`favoured` characters get +4: random walks through an open grammar end sooner)."""
    rng = torch.Generator().manual_seed(seed)
    manager = constrained(tok, seqs)
    assert set(manager.matchers) == {s.seq_id for s in seqs if s.params.structured is not None}
    running = list(seqs)
    boost = torch.zeros(vocab)
    boost[[tok.convert_tokens_to_ids(c) for c in favoured]] = 4.0
    while running:
        logits = torch.randn(len(running), vocab, generator=rng) * 3 + boost
        for s, result in zip(running, draw(manager, logits, running)):
            s.output_token_ids.append(result.token_id)
        running = [s for s in running if s.output_token_ids[-1] != tok.eos_token_id and len(s.output_token_ids) < 400]
    return [tok.decode(s.output_token_ids, skip_special_tokens=True) for s in seqs]


def test_every_constrained_output_validates_and_free_rows_share_the_call(tok) -> None:
    specs = [StructuredSpec.json_schema(schema) for schema in SCHEMAS.values()]
    for seed in range(8):
        seqs = [make_seq(tok, spec, seed, i) for i, spec in enumerate(specs)] + [make_seq(tok, None, seed, 9)]
        texts = generate(tok, seqs, len(tok), seed)
        for schema, text, s in zip(SCHEMAS.values(), texts, seqs):
            assert s.output_token_ids[-1] == tok.eos_token_id, text  # the grammar completed, then EOS
            jsonschema.validate(json.loads(text), schema)
        assert len(texts[-1]) > 0


def test_properties_come_in_schema_order(tok) -> None:
    schema = {
        "type": "object",
        "properties": {"zeta": {"enum": [1]}, "alpha": {"enum": [2]}},
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    (text,) = generate(tok, [make_seq(tok, StructuredSpec.json_schema(schema), 0)], len(tok), 0)
    assert text == '{"zeta": 1, "alpha": 2}'


def test_json_object_outputs_are_objects(tok) -> None:
    for seed in range(6):
        seqs = [make_seq(tok, StructuredSpec.json_object(), seed, i) for i in range(3)]
        for text, s in zip(generate(tok, seqs, len(tok), seed, favoured='"}]'), seqs):
            assert s.output_token_ids[-1] == tok.eos_token_id, text
            assert isinstance(json.loads(text), dict)


def test_free_row_is_unaffected_by_constrained_neighbours(tok) -> None:
    logits = torch.randn(3, len(tok), generator=torch.Generator().manual_seed(3)) * 3
    free = make_seq(tok, None, seed=4)
    alone = sample(logits[:1], [free])[0].token_id
    crowd = [free, make_seq(tok, StructuredSpec.regex("[0-9]+"), 1), make_seq(tok, StructuredSpec.choice(["x"]), 2)]
    results = [r.token_id for r in draw(constrained(tok, crowd), logits, crowd)]
    assert results[0] == alone
    assert tok.decode([results[1]]).isdigit()
    assert tok.decode([results[2]]) == "x"


@pytest.mark.parametrize(
    "spec, check",
    [
        (StructuredSpec.regex(r"[a-c]{2,5}-[0-9]{3}"), lambda t: re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", t)),
        (StructuredSpec.choice(["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
        (
            StructuredSpec.grammar('root ::= "(" [0-9] ("+" [0-9])* ")"'),
            lambda t: re.fullmatch(r"\([0-9](\+[0-9])*\)", t),
        ),
        (StructuredSpec.grammar('start: "<" /[xy]+/ ">"'), lambda t: re.fullmatch(r"<[xy]+>", t)),
    ],
)
def test_regex_choice_and_grammar(tok, spec: StructuredSpec, check) -> None:
    for seed in range(6):
        seqs = [make_seq(tok, spec, seed, i) for i in range(2)]  # n=2: one matcher per sample
        for text in generate(tok, seqs, len(tok), seed):
            assert check(text), text


def test_complete_grammar_allows_only_eos(tok) -> None:
    s = make_seq(tok, StructuredSpec.choice(["ok"]), seed=0)
    s.output_token_ids = tok.encode("ok")
    logits = torch.zeros(1, len(tok))
    logits[0, tok.eos_token_id] = -50.0  # EOS is the least likely token, and still the only one allowed
    manager = constrained(tok, [s])
    assert all(draw(manager, logits, [s])[0].token_id == tok.eos_token_id for _ in range(5))


def test_matcher_follows_output_tokens_not_picks(tok) -> None:
    """A step whose pick is dropped (abort, retry) or a recompute after preemption appends
    nothing new: the matcher stays in step with output_token_ids."""
    s = make_seq(tok, StructuredSpec.regex("abc"), seed=0)
    manager = constrained(tok, [s])
    logits = torch.zeros(1, len(tok))
    for expected in "abc":
        for _ in range(3):  # the same step sampled three times, only the last pick kept
            (r,) = draw(manager, logits, [s])
        assert tok.decode([r.token_id]) == expected
        s.output_token_ids.append(r.token_id)
    assert draw(manager, logits, [s])[0].token_id == tok.eos_token_id


def test_logits_wider_than_the_tokenizer(tok) -> None:
    s = make_seq(tok, StructuredSpec.choice(["z"]), seed=0)
    logits = torch.zeros(1, len(tok) + 64)
    logits[0, len(tok) :] = 100.0  # padded embedding rows the tokenizer never produces
    assert tok.decode([draw(constrained(tok, [s]), logits, [s])[0].token_id]) == "z"


@pytest.mark.parametrize(
    "spec",
    [
        StructuredSpec.json_schema({"type": "foo"}),
        StructuredSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}),
        StructuredSpec.json_schema({"$ref": "#/$defs/missing"}),
        StructuredSpec.json_schema([1, 2]),
        StructuredSpec("json_schema", "{not json"),
        StructuredSpec.regex("a(b"),
        StructuredSpec.choice([]),
        StructuredSpec("choice", '["a", 3]'),
        StructuredSpec.grammar('root ::= ( "yes" '),
        StructuredSpec.grammar("start: undefined_rule"),
    ],
)
def test_invalid_specs_raise_a_value_error(tok, spec: StructuredSpec) -> None:
    with pytest.raises(StructuredSpecError) as info:
        compile_structured(spec, tok)
    assert isinstance(info.value, ValueError) and info.value.kind == spec.kind and str(info.value)


def test_compile_cache_is_keyed_by_spec(tok) -> None:
    a = compile_structured(StructuredSpec.json_schema({"type": "object", "required": ["x"]}), tok)
    b = compile_structured(StructuredSpec.json_schema('{ "type" : "object",\n "required": ["x"] }'), tok)
    assert a is b  # the same schema with other whitespace is one cache entry
    assert compile_structured(StructuredSpec.json_schema({"type": "array"}), tok) is not a
    assert compile_structured(StructuredSpec.json_schema(True), tok).spec.spec == "true"


def test_sampler_needs_the_masks_for_structured_rows(tok) -> None:
    with pytest.raises(RuntimeError, match="grammar mask"):
        sample(torch.zeros(1, len(tok)), [make_seq(tok, StructuredSpec.json_object(), 0)])


def test_manager_holds_one_matcher_per_constrained_sequence(tok) -> None:
    manager = StructuredOutputManager(tok)
    free, spec = SamplingParams(), StructuredSpec.choice(["a", "b"])
    assert manager.new_matchers(free, 2) == []
    seqs = [make_seq(tok, spec, 0, i) for i in range(2)]
    matchers = manager.new_matchers(seqs[0].params, 2)
    manager.add(seqs, matchers)
    assert [manager.matchers[s.seq_id] for s in seqs] == matchers and matchers[0] is not matchers[1]
    assert manager.new_matchers(seqs[0].params, 2, prebuilt=matchers) == matchers  # built by the API: kept
    manager.free(seqs[0].seq_id)
    assert list(manager.matchers) == [seqs[1].seq_id]
    with pytest.raises(RuntimeError, match="no grammar matcher"):
        manager.grammar_masks(seqs, len(tok))
    masks = manager.grammar_masks([make_seq(tok, None, 0), seqs[1]], len(tok))
    assert masks is not None and masks.rows == [1] and masks.allowed.shape == (1, len(tok))
    assert {tok.decode([t]) for t in masks.allowed[0].nonzero().flatten().tolist()} == {"a", "b"}
    with pytest.raises(StructuredSpecError):
        manager.new_matchers(SamplingParams(structured=StructuredSpec.regex("a(b")), 1)
