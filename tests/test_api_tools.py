"""Tool calls through a live server: tool_choice none / auto / required / a named function,
streaming deltas, tool messages in the history, with the openai client."""

import json

import httpx
import jsonschema
import pytest
from server_util import MODEL, RunningServer, openai_client, tiny_core_factory

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},  # no arguments
]
SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}
# A Hermes-style template (as Qwen2.5's) that renders tools and tool calls.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': "
    "c.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hermes_factory():
    build = tiny_core_factory()

    def factory():
        core = build()
        core.tokenizer.chat_template = HERMES_TEMPLATE
        return core

    return factory


def chat(client, **kw):
    return client.chat.completions.create(
        **{"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "tools": TOOLS, **kw}
    )


def check_calls(calls) -> list[str]:
    """Every call names a tool and its arguments validate against that tool's schema."""
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    return [c.function.name for c in calls]


def test_named_function_is_forced(client) -> None:
    r = chat(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, n=3, temperature=1, seed=1)
    for choice in r.choices:
        assert choice.message.content is None and choice.finish_reason == "tool_calls"
        assert check_calls(choice.message.tool_calls) == ["get_weather"]
    no_args = chat(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert no_args.choices[0].message.tool_calls[0].function.arguments == "{}"


def test_required_makes_at_least_one_call(client, srv) -> None:
    close = srv.core.tokenizer.convert_tokens_to_ids("]")
    for seed in range(3):
        r = chat(client, tool_choice="required", temperature=1, seed=seed, logit_bias={str(close): 10})
        assert r.choices[0].finish_reason == "tool_calls" and len(check_calls(r.choices[0].message.tool_calls)) >= 1
        single = chat(client, tool_choice="required", temperature=1, seed=seed, parallel_tool_calls=False)
        assert len(check_calls(single.choices[0].message.tool_calls)) == 1


def test_required_cut_by_max_tokens_keeps_the_complete_calls(client) -> None:
    r = chat(client, tool_choice="required", temperature=1, seed=0, max_tokens=250)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content is None
    names = check_calls(r.choices[0].message.tool_calls)
    streamed, finishes = merged_stream(client, tool_choice="required", temperature=1, seed=0, max_tokens=250)
    assert names and [c["name"] for c in streamed] == names and finishes == ["length"]


def merged_stream(client, **kw) -> tuple[list[dict], list[str]]:
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chat(client, stream=True, **kw):
        for choice in chunk.choices:
            finishes += [choice.finish_reason] if choice.finish_reason else []
            assert not choice.delta.content  # a forced call streams no content
            for part in choice.delta.tool_calls or []:
                merged = calls.setdefault(part.index, {"id": part.id, "name": part.function.name, "arguments": ""})
                merged["arguments"] += part.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finishes


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_match(client, srv, tool_choice) -> None:
    bias = {str(srv.core.tokenizer.convert_tokens_to_ids("]")): 10}  # close the list of calls soon
    whole = chat(client, tool_choice=tool_choice, logit_bias=bias).choices[0].message.tool_calls
    streamed, finishes = merged_stream(client, tool_choice=tool_choice, logit_bias=bias)
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments) for c in whole]
    assert all(c["id"].startswith("call_") for c in streamed) and finishes == ["tool_calls"]


def test_openai_stream_helper_accumulates_calls(client) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls" and check_calls(final.choices[0].message.tool_calls)


def test_tool_choice_none_is_plain_text(client) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    r = chat(client, tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools are not rendered


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"tools": TOOLS}, "tool_choice", "does not render tools"),  # "auto" by default
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "does not render tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "foo"}}}],
                "tool_choice": "required",
            },
            "tools",
            "invalid json_schema",
        ),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", "pattern"),
    ],
)
def test_bad_tool_requests_400(srv, body: dict, param: str, words: str) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert words in r.json()["error"]["message"]


HISTORY = [
    *MESSAGES,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
]


def rendered(srv, messages: list[dict], **extra) -> str:
    ids = httpx.post(f"{srv.url}/tokenize", json={"messages": messages, **extra}).json()["tokens"]
    return httpx.post(f"{srv.url}/detokenize", json={"tokens": ids}).json()["prompt"]


def test_tool_history_without_a_tools_template(client, srv) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    text = rendered(srv, HISTORY)
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n<|im_start|>tool\n18 degrees<|im_end|>\n" in text
    r = client.chat.completions.create(model=MODEL, messages=HISTORY, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(srv.core.tokenizer.encode(text))


def test_auto_with_a_template_that_renders_tools() -> None:
    with RunningServer(hermes_factory()) as srv:
        client = openai_client(srv.wait_ready(), api_key="x")
        r = chat(client, max_tokens=6, extra_body={"ignore_eos": True})  # tool_choice "auto"
        expected = srv.core.tokenizer.apply_chat_template(
            MESSAGES, tools=TOOLS, add_generation_prompt=True, return_dict=False
        )
        history = rendered(srv, HISTORY, tools=TOOLS)
    assert r.usage.prompt_tokens == len(expected)  # the template showed the model the tools
    # the random model makes no call: its text is the content
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert '"name": "get_weather"' in history.split("<tools>")[1].split("</tools>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in history
