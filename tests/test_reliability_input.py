"""Issue 19, the input side against a live tiny server: lone surrogates anywhere (the tokenizer
routes, field names, the model name) are clean 400s; O(body) validation does not stall the
event loop; /tokenize and /detokenize have the completion routes' checks, admission and auth;
one request cannot take every waiting slot; token ids are checked against the model's width."""

import json
import threading
import time

import httpx
import pytest
from server_util import MODEL, RunningServer, tiny_core_factory
from test_reliability_server import block_steps
from tiny import byte_tokenizer, tiny_model

from server.engine.config import EngineConfig
from server.engine.core import EngineCore

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def srv():
    with RunningServer(tiny_core_factory(), api_key="k", max_waiting_requests=2) as server:
        yield server.wait_ready()


def post(srv, path: str, raw: str | bytes, key: str | None = "k", timeout: float = 60) -> httpx.Response:
    headers = {**JSON, **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{srv.url}{path}", content=raw, headers=headers, timeout=timeout)


@pytest.mark.parametrize(
    "path,raw,param",
    [
        ("/tokenize", '{"prompt": "a\\ud800"}', "prompt"),
        ("/tokenize", '{"model": "\\ud800", "prompt": "a"}', "model"),
        ("/tokenize", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
        ("/detokenize", '{"model": "\\ud800", "tokens": [5]}', "model"),
        (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ],
)
def test_lone_surrogates_are_400_on_every_route(srv, path: str, raw: str, param: str) -> None:
    r = post(srv, path, raw)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and "lone surrogate U+D" in error["message"]


def test_surrogate_in_a_field_name_is_a_clean_400(srv) -> None:
    """An unknown field named "\\ud800": the error must still encode as JSON."""
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}' % MODEL  # noqa: UP031 (JSON text: braces stay literal)
    r = post(srv, CHAT, raw)
    assert r.status_code == 400 and "lone surrogate U+D800" in r.json()["error"]["message"]


def test_tokenizer_routes_need_the_key(srv) -> None:
    for path, body in [("/tokenize", '{"prompt": "a"}'), ("/detokenize", '{"tokens": [5]}')]:
        assert post(srv, path, body, key=None).status_code == 401
        assert post(srv, path, body).status_code == 200


def test_tokenize_prompt_too_long_by_characters_is_rejected_before_tokenizing(srv) -> None:
    ctx = srv.app.state.logquant.ctx
    calls: list[object] = []
    tokenizer = srv.core.tokenizer
    tokenizer.encode = lambda *a, **k: calls.append(a)  # must not be reached
    try:
        r = post(srv, "/tokenize", json.dumps({"prompt": "x" * (ctx.max_prompt_chars + 1)}))
    finally:
        del tokenizer.encode
    assert calls == [] and r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_tokenizer_routes_share_the_admission_limit(srv) -> None:
    """With --max-waiting-requests 2 filled by two held chats, /tokenize and /detokenize get 429."""
    gate = block_steps(srv.core)
    engine = srv.app.state.logquant.ctx.engine
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    workers = [threading.Thread(target=post, args=(srv, CHAT, body)) for _ in range(2)]
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 30
        while engine.num_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        statuses = [
            post(srv, "/tokenize", '{"prompt": "a"}').status_code,
            post(srv, "/detokenize", '{"tokens": [5]}').status_code,
        ]
    finally:
        gate.set()
        del srv.core.step
        for worker in workers:
            worker.join(60)
    assert statuses == [429, 429]
    assert post(srv, "/tokenize", '{"prompt": "a"}').status_code == 200


def test_huge_token_id_body_does_not_stall_the_event_loop(srv) -> None:
    """Two 3.7 MiB bodies of 1.3M token ids at once: each is a 400 (longer than the context)
    and /health answers within 250 ms the whole time."""
    raw = json.dumps({"model": MODEL, "prompt": [0] * 1_300_000, "max_tokens": 1})
    results: list[httpx.Response] = []
    senders = [
        threading.Thread(target=lambda: results.append(post(srv, "/v1/completions", raw, timeout=120)))
        for _ in range(2)
    ]
    latencies = []
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for sender in senders:
            sender.start()
        while any(s.is_alive() for s in senders) or not latencies:
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
    for sender in senders:
        sender.join()
    assert [r.status_code for r in results] == [400, 400]
    assert all(r.json()["error"]["code"] == "context_length_exceeded" for r in results)
    assert max(latencies) < 0.25, sorted(latencies)[-5:]


def test_one_request_cannot_take_every_waiting_slot() -> None:
    """16 prompts x n 16 = 256 sequences is over the default per-request cap (64): a 400 naming
    the cap; a request at the cap runs."""
    with RunningServer(tiny_core_factory(max_num_seqs=64)) as server:
        server.wait_ready()
        body = {"model": MODEL, "prompt": ["hi"] * 16, "n": 16, "max_tokens": 1}
        over = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        at_cap = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 4}, timeout=120)
    error = over.json()["error"]
    assert over.status_code == 400 and error["param"] == "n" and "at most 64 sequences" in error["message"]
    assert at_cap.status_code == 200 and len(at_cap.json()["choices"]) == 64


def narrow_model_core() -> EngineCore:
    """The tokenizer has 259 tokens; the model's embedding and logits only 256."""
    model = tiny_model()
    model.resize_token_embeddings(256)
    config = EngineConfig(
        policy="logquant",
        fp_budget=24,
        group_size=8,
        kv_cache_memory=64 << 20,
        device="cpu",
        max_model_len=512,
        max_num_batched_tokens=64,
    )
    return EngineCore(config, model, byte_tokenizer())


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"prompt": [40, 257]}, "prompt"),
        ({"prompt": "a", "logit_bias": {"258": 5}}, "logit_bias"),
        ({"prompt": "a", "stop_token_ids": [256]}, "stop_token_ids"),
    ],
)
def test_token_ids_are_checked_against_the_model_width(extra: dict, param: str) -> None:
    with RunningServer(narrow_model_core) as server:
        server.wait_ready()
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "max_tokens": 2, **extra}, timeout=60)
        ok = httpx.post(
            f"{server.url}/v1/completions", json={"model": MODEL, "prompt": [40, 255], "max_tokens": 2}, timeout=60
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == param and "[0, 256)" in r.json()["error"]["message"]
    assert ok.status_code == 200


def test_logged_user_and_prompt_are_clipped(srv, caplog) -> None:
    import logging

    from server.logs import JsonFormatter

    ctx = srv.app.state.logquant.ctx
    ctx.log_prompts, ctx.max_log_len = True, 50
    caplog.set_level(logging.INFO, logger="logquant.requests")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "p" * 400}], "max_tokens": 2, "user": "u" * 10_000}
    try:
        assert post(srv, CHAT, json.dumps(body)).status_code == 200
    finally:
        ctx.log_prompts, ctx.max_log_len = False, 1000
    (record,) = [r for r in caplog.records if r.name == "logquant.requests"]
    line = json.loads(JsonFormatter().format(record))
    assert line["user"] == "u" * 50 + "... (10000 characters)"
    assert line["prompt"].startswith('["ppp') and line["prompt"].endswith("... (404 characters)")
