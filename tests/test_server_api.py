"""The HTTP server through a real uvicorn on 127.0.0.1, with the official openai client."""

import asyncio
import json
import threading

import httpx
import openai
import pytest
from server_util import MODEL, RunningServer, tiny_core_factory, wait_for
from test_reliability_server import block_steps

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


@pytest.fixture(scope="module")
def srv():
    with RunningServer(tiny_core_factory(), max_waiting_requests=8) as server:
        yield server.wait_ready()


def chat(client, **kw):
    args = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(**args)


def test_chat_basic_and_usage(client, srv) -> None:
    r = chat(client, extra_body={"ignore_eos": True})
    prompt_len = len(srv.core.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False))
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == prompt_len and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == prompt_len + 12
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.system_fingerprint == "logquant-fp24-g8"


def test_greedy_deterministic_and_max_completion_tokens(client) -> None:
    a = chat(client, extra_body={"ignore_eos": True})
    b = chat(client, max_tokens=None, max_completion_tokens=12, extra_body={"ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content
    assert chat(client, max_tokens=3, extra_body={"ignore_eos": True}).usage.completion_tokens == 3


def test_streaming_matches_non_streaming(client) -> None:
    full = chat(client, extra_body={"ignore_eos": True})
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_async_client(srv) -> None:
    async def go():
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        rs = await asyncio.gather(
            *[
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
                for _ in range(3)
            ]
        )
        return {r.choices[0].message.content for r in rs}

    assert len(asyncio.run(go())) == 1  # concurrent identical greedy requests agree


def test_seed_and_n(client) -> None:
    a = chat(client, temperature=1.0, seed=42, n=3, extra_body={"ignore_eos": True})
    b = chat(client, temperature=1.0, seed=42, n=3, extra_body={"ignore_eos": True})
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 36
    c = chat(client, temperature=1.0, seed=43, n=3, extra_body={"ignore_eos": True})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_stop_strings(client) -> None:
    full = chat(client, max_tokens=20, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[5:7]
    first = full.find(stop)
    r = chat(client, max_tokens=20, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:first] and r.choices[0].finish_reason == "stop"
    chunks = list(chat(client, max_tokens=20, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:first]


def test_sampling_parameters_change_output(client) -> None:
    base = chat(client, max_tokens=20, extra_body={"ignore_eos": True}).choices[0].message.content
    penalized = chat(client, max_tokens=20, extra_body={"ignore_eos": True, "repetition_penalty": 5.0})
    assert penalized.choices[0].message.content != base
    top1 = chat(client, max_tokens=20, temperature=1.5, extra_body={"ignore_eos": True, "top_k": 1})
    assert top1.choices[0].message.content == base
    hot = {chat(client, temperature=2.0, seed=s).choices[0].message.content for s in range(3)}
    assert len(hot) > 1
    cold = {chat(client, temperature=1.0, top_p=1e-6, seed=s).choices[0].message.content for s in range(3)}
    assert cold == {chat(client).choices[0].message.content}


def test_logprobs(client) -> None:
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the best


def test_completions_endpoint(client) -> None:
    r = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text.startswith("Once upon") and r.usage.prompt_tokens == 9
    multi = client.completions.create(model=MODEL, prompt=["a", "bb"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3] and multi.usage.prompt_tokens == 3
    lp = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    assert len(lp.choices[0].logprobs.token_logprobs) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "Once upon" + "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_models_health_ready(client, srv) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{srv.url}/v1/models").json()["data"][0]["max_model_len"] == 512
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"n": 100}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"max_tokens": "4"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"n": "2"}, "n"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": False}, "temperature"),
        ({"seed": "1"}, "seed"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": "true"}, "logprobs"),
        ({"stream": "false"}, "stream"),
        ({"ignore_eos": 0}, "ignore_eos"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_bad_parameters_400(srv, payload: dict, param: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, **payload}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert error_of(r)["param"] == param


@pytest.mark.parametrize(
    "payload,param",
    [({"echo": 1}, "echo"), ({"logprobs": "2"}, "logprobs"), ({"prompt": [1, True]}, "prompt")],
)
def test_completions_strict_types_400(srv, payload: dict, param: str) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "hi", **payload})
    assert r.status_code == 400
    assert error_of(r)["param"] == param


def test_float_fields_take_json_integers(client) -> None:
    r = chat(client, temperature=1, top_p=1, max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_context_length_exceeded(srv) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 500})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


def test_unknown_model_404(srv) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    assert httpx.get(f"{srv.url}/v1/nope").status_code == 404


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"model": 1e999999}'])
def test_malformed_bodies_are_4xx(srv, raw: bytes) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    error_of(r)


def test_body_too_large_413(srv) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=json.dumps(big))
    assert r.status_code == 413
    error_of(r)


def test_queue_limit_429(srv) -> None:
    """n 9 can never wait with --max-waiting-requests 8: a 400; once 8 sequences wait, a 429."""
    url, body = f"{srv.url}/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    never = httpx.post(url, json={**body, "n": 9})
    assert never.status_code == 400 and error_of(never)["param"] == "n"
    gate, engine = block_steps(srv.core), srv.app.state.logquant.ctx.engine
    worker = threading.Thread(target=lambda: httpx.post(url, json={**body, "n": 8}, timeout=60))
    try:
        worker.start()
        wait_for(lambda: engine.num_waiting == 8, "8 sequences waiting")
        r = httpx.post(url, json=body)
    finally:
        gate.set()
        del srv.core.step
        worker.join(60)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert error_of(r)["type"] == "rate_limit_error"
