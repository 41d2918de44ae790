"""Structured outputs through a live server: response_format, vLLM's structured_outputs and
guided_* fields, on the tiny model (every field, errors) and on the default model (several
schemas, every output parses and validates, streaming or not)."""

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field
from server_util import MODEL, RunningServer, openai_client

from logquant.models import DEFAULT_MODEL
from server.engine.config import EngineConfig
from server.engine.core import EngineCore

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat_text(client, n: int = 1, **kw) -> list[str]:
    r = client.chat.completions.create(
        **{"model": MODEL, "messages": MESSAGES, "max_tokens": 120, "n": n, "temperature": 1, "seed": 7, **kw}
    )
    assert all(c.finish_reason == "stop" for c in r.choices)
    return [c.message.content for c in r.choices]


def stream_text(client, **kw) -> str:
    chunks = client.chat.completions.create(
        **{"model": MODEL, "messages": MESSAGES, "max_tokens": 120, "temperature": 0, "stream": True, **kw}
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": json_schema_format(PERSON)},
        {"extra_body": {"guided_json": PERSON}},
        {"extra_body": {"guided_json": json.dumps(PERSON)}},
        {"extra_body": {"structured_outputs": {"json": PERSON}}},
    ],
)
def test_json_schema_fields(client, fields: dict) -> None:
    for text in [*chat_text(client, n=3, **fields), stream_text(client, **fields)]:
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object(client, srv) -> None:
    close = {str(srv.core.tokenizer.convert_tokens_to_ids("}")): 5}  # the random model ends objects sooner
    for fields in [
        {"response_format": {"type": "json_object"}},
        {"extra_body": {"structured_outputs": {"json_object": True}}},
    ]:
        for text in chat_text(client, n=2, max_tokens=300, logit_bias=close, **fields):
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "fields,check",
    [
        ({"guided_regex": r"[a-z]{3}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
        ({"structured_outputs": {"regex": r"(yes|no)!"}}, lambda t: t in ("yes!", "no!")),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"guided_grammar": 'start: "ab" | "cd" "!"'}, lambda t: t in ("ab", "cd!")),
        ({"structured_outputs": {"grammar": 'root ::= "x" [0-9]'}}, lambda t: re.fullmatch(r"x[0-9]", t)),
    ],
)
def test_regex_choice_grammar(client, fields: dict, check) -> None:
    texts = chat_text(client, n=3, extra_body=fields) + [stream_text(client, extra_body=fields)]
    assert all(check(t) for t in texts), texts


def test_completions_endpoint_takes_the_same_fields(client) -> None:
    r = client.completions.create(
        model=MODEL,
        prompt=["a", "b"],
        max_tokens=20,
        n=2,
        temperature=1,
        seed=3,
        extra_body={"guided_regex": r"[0-9]{4}"},
    )
    assert len(r.choices) == 4 and all(re.fullmatch(r"[0-9]{4}", c.text) for c in r.choices)


def test_text_format_is_unconstrained(client) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    text = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, response_format={"type": "text"}
    )
    assert text.choices[0].message.content == plain.choices[0].message.content


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=4)


def test_openai_parse_with_a_pydantic_model(client) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0, response_format=Pet
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and 0 <= pet.legs <= 4


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"response_format": json_schema_format({"type": "foo"})}, "response_format", "invalid json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
        ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "invalid grammar"),
        ({"guided_choice": []}, "guided_choice", "at least 1"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "not both guided_regex and guided_choice"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "Unsupported"),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "Unsupported"),
    ],
)
def test_invalid_constraints_400(srv, body: dict, param: str, words: str) -> None:
    for stream in (False, True):
        payload = {"model": MODEL, "messages": MESSAGES, "stream": stream, **body}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=payload)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert words in r.json()["error"]["message"]


# ---- the default model ---------------------------------------------------------------------
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "fruits": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4}
        },
        "required": ["fruits"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "count": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
        },
        "required": ["age", "score", "count"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def default_model_client():
    def factory() -> EngineCore:
        config = EngineConfig(
            model=DEFAULT_MODEL,
            policy="logquant",
            fp_budget=192,
            kv_cache_memory=128 << 20,
            device="cpu",
            max_model_len=2048,
        )
        return EngineCore.from_config(config)

    with RunningServer(factory, model=DEFAULT_MODEL, fp_budget=192, group_size=32) as server:
        server.wait_ready()
        yield openai_client(server, api_key="x", timeout=300)


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_default_model_outputs_validate(default_model_client, name: str) -> None:
    schema = SCHEMAS[name]
    messages = [{"role": "user", "content": f"Give me an example JSON object for this schema: {json.dumps(schema)}"}]
    args = {
        "model": DEFAULT_MODEL,
        "messages": messages,
        "max_tokens": 200,
        "response_format": json_schema_format(schema),
    }
    r = default_model_client.chat.completions.create(**args, n=2, temperature=0.8, seed=0)
    chunks = default_model_client.chat.completions.create(**args, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    outputs = [c.message.content for c in r.choices] + [streamed]
    assert all(c.finish_reason == "stop" for c in r.choices)
    for text in outputs:
        jsonschema.validate(json.loads(text), schema)


class Event(BaseModel):
    title: str = Field(max_length=40)
    day: Literal["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
    attendees: list[str] = Field(max_length=3)


@pytest.mark.real_model
def test_default_model_parse(default_model_client) -> None:
    messages = [{"role": "user", "content": "Alice and Bob meet for a science fair on Friday. Extract the event."}]
    completion = default_model_client.chat.completions.parse(
        model=DEFAULT_MODEL, messages=messages, max_tokens=200, temperature=0, response_format=Event
    )
    event = completion.choices[0].message.parsed
    assert isinstance(event, Event) and event.day in Event.model_fields["day"].annotation.__args__
