"""vLLM's extra request fields through a live server with the openai client."""

import httpx
import pytest
from server_util import MODEL
from transformers.convert_slow_tokenizer import bytes_to_unicode

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]
BYTE_CHAR = bytes_to_unicode()


def chat(client, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    args = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "temperature": 0, **kw}
    return client.chat.completions.create(**args, extra_body=extra)


def generated_ids(srv, response) -> list[int]:
    """Token ids of a byte-tokenizer completion, from its logprob bytes."""
    tokens = [BYTE_CHAR[e.bytes[0]] for e in response.choices[0].logprobs.content]
    return srv.core.tokenizer.convert_tokens_to_ids(tokens)


def test_logprob_bytes_are_the_raw_token_bytes(client) -> None:
    r = chat(client, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert all(len(e.bytes) == 1 for e in entries)  # one byte per token in this tokenizer
    raw = b"".join(bytes(e.bytes) for e in entries)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    assert all(len(t.bytes) == 1 for e in entries for t in e.top_logprobs)


def test_stop_token_ids(client, srv) -> None:
    full = chat(client, logprobs=True)
    ids = generated_ids(srv, full)
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token's first occurrence
    r = chat(client, extra_body={"stop_token_ids": [ids[cut]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut + 1
    assert r.choices[0].message.content == srv.core.tokenizer.decode(ids[:cut])
    kept = chat(client, extra_body={"stop_token_ids": [ids[cut]], "include_stop_str_in_output": True})
    assert kept.choices[0].message.content == srv.core.tokenizer.decode(ids[: cut + 1])


def test_include_stop_str_in_output(client) -> None:
    full = chat(client, max_tokens=40).choices[0].message.content
    first = next(i for i in range(len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isprintable())
    stop = full[first : first + 2]
    r = chat(client, max_tokens=40, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].message.content == full[: first + 2] and r.choices[0].finish_reason == "stop"
    chunks = chat(client, max_tokens=40, stop=stop, stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: first + 2]


def test_token_id_prompts(client) -> None:
    def complete(prompt):
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )

    both = complete([[40, 41, 42], [50, 51]])
    assert [c.index for c in both.choices] == [0, 1] and both.usage.prompt_tokens == 5
    assert [c.text for c in both.choices] == [
        complete([40, 41, 42]).choices[0].text,
        complete([50, 51]).choices[0].text,
    ]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [[40], [259]]}, "prompt"),
        ({"prompt": [[40], []]}, "prompt"),
        ({"prompt": [[40], ["a"]]}, "prompt"),
        ({"prompt": "a", "stop_token_ids": [5, 300]}, "stop_token_ids"),
        ({"prompt": "a", "stop_token_ids": ["5"]}, "stop_token_ids.0"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "stop": ["a", 1]}, "stop"),
        ({"prompt": "a", "skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"prompt": "a", "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ],
)
def test_bad_fields_400(srv, body: dict, param: str) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_continuous_usage_stats(client, srv) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(chat(client, max_tokens=5, stream=True, stream_options=options, logprobs=True))
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert all(c.usage is not None and c.usage.prompt_tokens == prompt_tokens for c in chunks)
    # the role chunk, one chunk per token (logprobs), the finish chunk, the usage chunk
    assert [c.usage.completion_tokens for c in chunks] == [0, 1, 2, 3, 4, 5, 5, 5]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == prompt_tokens + 5
    plain = list(chat(client, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 5


def special_ids(srv) -> tuple[int, int]:
    return tuple(srv.core.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))


def test_logit_bias(client, srv) -> None:
    x = srv.core.tokenizer.convert_tokens_to_ids("x")
    r = chat(client, max_tokens=5, logit_bias={str(x): 100})
    assert r.choices[0].message.content == "xxxxx"
    _, im_end = special_ids(srv)
    ended = chat(client, logit_bias={str(im_end): 100}, extra_body={"ignore_eos": False})
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1
    assert ended.choices[0].message.content == ""


def test_min_tokens_holds_off_eos(client, srv) -> None:
    _, im_end = special_ids(srv)
    body = {"ignore_eos": False, "min_tokens": 3}
    r = chat(client, logit_bias={str(im_end): 100}, extra_body=body)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({}, ""),
        ({"skip_special_tokens": False}, "<|im_start|> <|im_start|> <|im_start|>"),
        ({"skip_special_tokens": False, "spaces_between_special_tokens": False}, "<|im_start|>" * 3),
    ],
)
def test_special_tokens_in_output(client, srv, extra: dict, expected: str) -> None:
    im_start, _ = special_ids(srv)
    r = chat(client, max_tokens=3, logit_bias={str(im_start): 100}, extra_body=extra)
    assert r.choices[0].message.content == expected


def test_eos_text_with_include_stop_str_in_output(client, srv) -> None:
    _, im_end = special_ids(srv)
    extra = {"ignore_eos": False, "skip_special_tokens": False}
    dropped = chat(client, logit_bias={str(im_end): 100}, extra_body=extra)
    kept = chat(client, logit_bias={str(im_end): 100}, extra_body={**extra, "include_stop_str_in_output": True})
    assert dropped.choices[0].message.content == "" and kept.choices[0].message.content == "<|im_end|>"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"logit_bias": {"259": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"x": 1}}, "logit_bias.x.[key]"),
        ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ],
)
def test_bad_bias_and_min_tokens_400(srv, body: dict, param: str) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
