"""Sampling defaults from the model's generation_config (--generation-config), and errors of a
stream sent before its HTTP 200."""

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
from server_util import MODEL, RunningServer, tiny_core_factory
from tiny import byte_tokenizer, tiny_model
from transformers import GenerationConfig

from server.api.sampling import generation_defaults
from server.engine.config import EngineConfig
from server.engine.core import EngineCore

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


def factory_with(**generation: object):
    build = tiny_core_factory()

    def factory():
        core = build()
        for key, value in generation.items():
            setattr(core.model.generation_config, key, value)
        return core

    return factory


def texts(client: openai.OpenAI, n: int = 3, **extra: object) -> list[str]:
    outs = []
    for seed in range(n):
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, seed=seed, max_tokens=8, extra_body={"ignore_eos": True, **extra}
        )
        outs.append(r.choices[0].message.content)
    return outs


@pytest.mark.parametrize("source", ["auto", "vllm"])
def test_generation_config_defaults(source: str) -> None:
    factory = factory_with(top_k=1, max_new_tokens=7)
    with RunningServer(factory, generation_config=source) as srv:
        client = openai.OpenAI(base_url=f"{srv.wait_ready().url}/v1", api_key="x", max_retries=0, timeout=60)
        greedy = texts(client, n=1, temperature=0)[0]
        sampled = texts(client)  # temperature 1 and no top_k in the request
        explicit = texts(client, top_k=0)  # the request's own value wins
        no_limit = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
    assert len(set(explicit)) == 3
    if source == "auto":  # top_k=1 from the generation config: every seed gives the greedy text
        assert sampled == [greedy] * 3 and no_limit.usage.completion_tokens == 7
    else:
        assert len(set(sampled)) == 3
        assert no_limit.usage.completion_tokens == 512 - no_limit.usage.prompt_tokens


def test_generation_defaults_read_only_what_the_config_sets(tmp_path: Path) -> None:
    model = tiny_model()
    assert generation_defaults(model, "auto") == {}
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9
    model.generation_config.repetition_penalty = 1.2
    assert generation_defaults(model, "auto") == {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.2}
    assert generation_defaults(model, "vllm") == {}
    GenerationConfig(do_sample=True, min_p=0.05, max_new_tokens=64).save_pretrained(tmp_path)
    assert generation_defaults(model, str(tmp_path)) == {"min_p": 0.05, "max_tokens": 64}


def test_out_of_range_generation_config_is_a_load_error() -> None:
    model = tiny_model()
    model.generation_config.repetition_penalty = 50.0
    with pytest.raises(ValueError, match="repetition_penalty must be in .* --generation-config vllm"):
        generation_defaults(model, "auto")


def test_stream_errors_come_before_the_200() -> None:
    with RunningServer(tiny_core_factory()) as srv:
        srv.wait_ready().app.state.logquant.ctx.engine.shutdown()
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 503 and r.headers["content-type"] == "application/json"
            error = r.read()
        completion = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}
        assert httpx.post(f"{srv.url}/v1/completions", json=completion).status_code == 503
    assert b"not running" in error


def test_default_max_tokens_is_admitted_on_a_small_kv_budget() -> None:
    """fp16 on a KV budget that holds one ~300-token sequence: max_model_len is capped to it,
    and requests without max_tokens run to the end of the context (two at once: preemption)."""

    def factory() -> EngineCore:
        config = EngineConfig(
            policy="fp16",
            fp_budget=24,
            group_size=8,
            kv_cache_memory=300 << 10,
            device="cpu",
            max_num_batched_tokens=64,
        )
        return EngineCore(config, tiny_model(), byte_tokenizer())

    with RunningServer(factory, policy="fp16") as srv:
        client = openai.AsyncOpenAI(base_url=f"{srv.wait_ready().url}/v1", api_key="x", max_retries=0, timeout=120)
        max_model_len = srv.core.max_model_len

        async def both():
            return await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}
                    )
                    for _ in range(2)
                ]
            )

        responses = asyncio.run(both())
    assert 64 < max_model_len < 2048  # capped by the budget
    for r in responses:
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens + r.usage.completion_tokens == max_model_len
