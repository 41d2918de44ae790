"""Issue 13 against a live server: admission under a burst, no stall on big prompts, no
internal text in errors, requests that can never fit, auth before the body, CORS."""

import asyncio
import json
import logging
import threading

import httpx
import pytest
from server_util import MODEL, RunningServer, tiny_core_factory, wait_for
from tiny import byte_tokenizer, tiny_model

from server.engine.config import EngineConfig
from server.engine.core import EngineCore

CHAT = "/v1/chat/completions"


def chat_body(content: str = "hello", **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


@pytest.fixture(scope="module")
def srv():
    with RunningServer(tiny_core_factory(max_num_seqs=4), max_waiting_requests=16) as server:
        yield server.wait_ready()


def block_steps(core: EngineCore) -> threading.Event:
    """Hold the engine thread before its next step until the returned event is set."""
    gate, step = threading.Event(), core.step

    def held_step():
        gate.wait(60)
        return step()

    core.step = held_step
    return gate


def test_waiting_limit_holds_under_a_burst(srv) -> None:
    """64 requests at once with --max-waiting-requests 16 and max_num_seqs 4: requests count
    from acceptance, so at least 64 - 16 - 4 get a 429 (here the engine is held, so all but 16)."""
    core = srv.core
    gate = block_steps(core)
    answered: list[int] = []

    async def one(client: httpx.AsyncClient) -> int:
        r = await client.post(CHAT, json=chat_body(max_tokens=2))
        answered.append(r.status_code)
        return r.status_code

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as client:
            requests = asyncio.gather(*(one(client) for _ in range(64)))
            in_engine = lambda: len(core.scheduler.waiting) + len(core.scheduler.running)  # noqa: E731
            while len(answered) + in_engine() < 64:  # every request answered or in the engine
                await asyncio.sleep(0.01)
            gate.set()
            return await requests

    try:
        statuses = asyncio.run(burst())
    finally:
        gate.set()
        del core.step
    assert statuses.count(429) >= 64 - 16 - 4 and statuses.count(429) + statuses.count(200) == 64
    assert srv.app.state.logquant.ctx.engine.num_waiting == 0  # nothing admitted is left behind


def test_tokenization_runs_off_the_event_loop(srv) -> None:
    """While a prompt is being tokenized, /health still answers: the chat template is held
    until /health has answered, which would deadlock if it ran on the event loop."""
    tokenizer = srv.core.tokenizer
    started, health_answered = threading.Event(), threading.Event()
    render = tokenizer.apply_chat_template

    def held_render(*args, **kwargs):
        started.set()
        answered_in_time = health_answered.wait(10)
        return render(*args, **kwargs) if answered_in_time else []

    tokenizer.apply_chat_template = held_render
    try:
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{srv.url}{CHAT}", json=chat_body(), timeout=60))
        )
        worker.start()
        assert started.wait(20)
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
        health_answered.set()
        worker.join(60)
    finally:
        del tokenizer.apply_chat_template
    assert result["r"].status_code == 200


def test_prompt_too_long_by_characters_is_rejected_before_tokenizing(srv) -> None:
    ctx = srv.app.state.logquant.ctx
    calls: list[object] = []
    tokenizer = srv.core.tokenizer
    tokenizer.apply_chat_template = lambda *a, **k: calls.append(a)  # must not be reached
    tokenizer.encode = lambda *a, **k: calls.append(a)
    huge = "x" * (ctx.max_prompt_chars + 1)
    try:
        chat = httpx.post(f"{srv.url}{CHAT}", json=chat_body(huge), timeout=60)
        listed = {"model": MODEL, "prompt": ["hi", huge], "max_tokens": 2}
        completion = httpx.post(f"{srv.url}/v1/completions", json=listed, timeout=60)
    finally:
        del tokenizer.apply_chat_template, tokenizer.encode
    assert calls == []
    for r, param in [(chat, "messages"), (completion, "prompt")]:
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == param


@pytest.mark.parametrize(
    "path,raw,param",
    [
        (CHAT, '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL, "messages.0.content"),  # noqa: UP031
        ("/v1/completions", '{"model": "%s", "prompt": ["ok", "\\udfff"]}' % MODEL, "prompt.1"),  # noqa: UP031
        (CHAT, '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud83d"}' % MODEL, "stop"),  # noqa: UP031
    ],
)
def test_lone_surrogate_is_a_clean_400(srv, path: str, raw: str, param: str) -> None:
    r = httpx.post(f"{srv.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param
    assert "lone surrogate U+D" in error["message"] and "TextEncodeInput" not in error["message"]


def test_internal_error_logged_with_the_request_id_not_returned(srv, caplog) -> None:
    runner = srv.core.runner
    execute = runner.execute

    def broken(*args, **kwargs):
        runner.execute = execute
        raise RuntimeError("secret internal detail")

    runner.execute = broken
    caplog.set_level(logging.ERROR, logger="logquant.requests")
    r = httpx.post(f"{srv.url}{CHAT}", json=chat_body(), timeout=60)
    assert r.status_code == 500 and "secret" not in r.text
    request_id = r.json()["error"]["message"].split("request id ")[1].rstrip(").")
    logged = [rec for rec in caplog.records if rec.name == "logquant.requests" and request_id in rec.getMessage()]
    assert len(logged) == 1 and "secret internal detail" in repr(logged[0].exc_info[1].__cause__)


def test_ready_does_not_show_the_load_exception() -> None:
    def failing_factory() -> EngineCore:
        raise RuntimeError("cannot open /secret/path/model.bin")

    with RunningServer(failing_factory) as server:
        wait_for(lambda: "loading" not in httpx.get(f"{server.url}/ready").text, "load failure")
        r = httpx.get(f"{server.url}/ready")
    assert r.status_code == 503 and "secret" not in r.text and "failed to load" in r.json()["error"]["message"]


def test_request_that_never_fits_the_kv_budget_is_a_400() -> None:
    """A 64 KiB budget holds one sequence of 168 tokens: max_model_len is capped to that, and a
    longer request is a 400 (context length), not a 429 that retrying cannot cure."""

    def small_kv() -> EngineCore:
        config = EngineConfig(
            policy="logquant",
            fp_budget=24,
            group_size=8,
            kv_cache_memory=64 << 10,
            device="cpu",
            max_num_batched_tokens=64,
        )
        return EngineCore(config, tiny_model(), byte_tokenizer())

    with RunningServer(small_kv) as server:
        server.wait_ready()
        cards = httpx.get(f"{server.url}/v1/models").json()["data"]
        r = httpx.post(f"{server.url}{CHAT}", json=chat_body("word " * 30, max_tokens=100), timeout=60)
    assert cards[0]["max_model_len"] == 168
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_api_key_checked_before_the_body_and_bearer_case_insensitive() -> None:
    with RunningServer(tiny_core_factory(), api_key="s3cret", max_body_bytes=1024) as server:
        server.wait_ready()
        post = lambda **kw: httpx.post(f"{server.url}{CHAT}", timeout=60, **kw)  # noqa: E731
        bad_json = post(content=b"{not json", headers={"content-type": "application/json"})
        too_big = post(json=chat_body("x" * 4096))
        statuses = [
            post(json=chat_body(), headers={"Authorization": f"{scheme} s3cret"}).status_code
            for scheme in ("Bearer", "bearer", "BEARER")
        ]
        wrong = post(json=chat_body(), headers={"Authorization": "Basic s3cret"})
        tokenize = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"})
    assert bad_json.status_code == 401 and too_big.status_code == 401
    assert bad_json.json()["error"]["code"] == "invalid_api_key"
    assert statuses == [200, 200, 200] and wrong.status_code == 401 and tokenize.status_code == 401


def test_cors_off_by_default_and_on_for_allowed_origins() -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    results = {}
    for origins in ([], ["https://app.example"]):
        with RunningServer(tiny_core_factory(), allowed_origins=origins, api_key="k") as server:
            options = httpx.options(f"{server.url}{CHAT}", headers=preflight)
            health = httpx.get(f"{server.url}/health", headers={"Origin": "https://app.example"})
            other = httpx.get(f"{server.url}/health", headers={"Origin": "https://evil.example"})
            results[bool(origins)] = (options, health, other)
    off_options, off_health, _ = results[False]
    assert "access-control-allow-origin" not in off_options.headers and off_options.status_code == 401
    assert "access-control-allow-origin" not in off_health.headers
    on_options, on_health, on_other = results[True]
    assert on_options.status_code == 200 and on_options.headers["access-control-allow-origin"] == "https://app.example"
    assert on_health.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in on_other.headers


def test_error_body_is_json_with_openai_shape(srv) -> None:
    r = httpx.post(f"{srv.url}{CHAT}", content=b'{"model": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(json.loads(r.text)["error"]) == {"message", "type", "param", "code"}
