"""Issue 19, per-step work bounded by the batch, not by a request's lists: stop-token sets built
once, logit-bias tensors built once per request, top-logprob text decoded once per token id,
grammar matchers built off the engine thread with masks filled in one batched call, a grammar
cache bounded by bytes, and the schema's list caps."""

import threading

import httpx
import llguidance.torch
import pytest
import torch
from server_util import MODEL
from tiny import byte_tokenizer

from server.api.errors import APIError, validation_error
from server.api.intake import parse_request
from server.api.protocol import ChatCompletionRequest, CompletionRequest, RequestLimits
from server.engine import structured
from server.engine.request import SamplingParams, SequenceState, StructuredSpec
from server.engine.sampler import process_logits, sample
from server.engine.structured_outputs import StructuredOutputManager

LIMITS = RequestLimits(max_model_len=512, max_sequences=64)


class CountingList(list):
    """A list that counts how often it is searched or walked."""

    uses = 0

    def __contains__(self, item: object) -> bool:
        type(self).uses += 1
        return super().__contains__(item)

    def __iter__(self):
        type(self).uses += 1
        return super().__iter__()


class CountingDict(dict):
    reads = 0

    def items(self):
        type(self).reads += 1
        return super().items()


def test_stop_token_ids_are_a_set_built_once() -> None:
    """check_stop runs per token per sample: it must not walk the request's list each time."""
    params = SamplingParams(max_tokens=500, stop_token_ids=CountingList([7] * 1000 + list(range(8, 40))))
    params.validate()
    seq = SequenceState("r-0", "r", 0, [1, 2], params, eos_token_ids=(3,))
    CountingList.uses = 0
    for token in range(100, 300):
        seq.output_token_ids.append(token)
        assert seq.check_stop(max_model_len=4096) is None
    seq.output_token_ids.append(39)
    assert seq.check_stop(4096) == "stop" and CountingList.uses <= 1


def test_logit_bias_tensors_are_built_once_per_request() -> None:
    bias = CountingDict({i: 50.0 if i == 9 else -1.0 for i in range(1, 200)})
    params = SamplingParams(logit_bias=bias, min_tokens=5, stop_token_ids=[4, 4, 5])
    seqs = [SequenceState(f"r-{i}", "r", i, [1], params, eos_token_ids=(3,)) for i in range(2)]
    CountingDict.reads = 0
    for _ in range(6):
        out = process_logits(torch.zeros(2, 259), seqs)
        assert out[:, 9].tolist() == [50.0, 50.0] and out[:, 1].tolist() == [-1.0, -1.0]
        assert out[:, [3, 4, 5]].isinf().all()  # min_tokens masks EOS and the stop tokens
    assert CountingDict.reads == 1


@pytest.mark.parametrize(
    "field,value,param",
    [
        ("stop_token_ids", [5] * 1025, "stop_token_ids"),
        ("logit_bias", {str(i): 1 for i in range(1025)}, "logit_bias"),
        ("tools", [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "tools"),
    ],
)
def test_list_caps_of_the_schema(field: str, value: object, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(APIError) as raised:
        parse_request(ChatCompletionRequest, _json(body), None, LIMITS, ("messages",), 10**6)
    assert raised.value.status == 400 and raised.value.param == param
    at_cap = {**body, field: value[:-1] if isinstance(value, list) else dict(list(value.items())[:-1])}
    assert parse_request(ChatCompletionRequest, _json(at_cap), None, LIMITS, ("messages",), 10**6)


def test_prompt_lists_are_refused_by_length_first() -> None:
    """Token ids beyond the context: context_length_exceeded; more prompts than the sequence cap: 400."""
    for prompt, code in [([0] * 513, "context_length_exceeded"), ([[0]] * 65, None), (["a"] * 65, None)]:
        with pytest.raises(APIError) as raised:
            parse_request(
                CompletionRequest, _json({"model": MODEL, "prompt": prompt}), None, LIMITS, ("prompt",), 10**6
            )
        assert raised.value.status == 400 and raised.value.param == "prompt" and raised.value.code == code


def _json(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()


def test_top_logprob_text_is_decoded_once_per_token_id(srv) -> None:
    """n 4 x 12 tokens x 6 entries: each distinct token id is decoded once, on later requests never."""
    tokenizer = srv.core.tokenizer
    decoded: list[int] = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, *a, **k: (decoded.append(len(ids)) if len(ids) == 1 else None, decode(ids, *a, **k))[
        1
    ]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 12,
        "n": 4,
        "logprobs": True,
        "top_logprobs": 5,
        "ignore_eos": True,
        "temperature": 0,
    }
    try:
        first = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
        singles_after_first = len(decoded)
        again = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
    finally:
        del tokenizer.decode
    entries = [e for c in first["choices"] for e in c["logprobs"]["content"]]
    distinct = {t["token"] for e in entries for t in [e, *e["top_logprobs"]]}
    assert len(entries) == 48 and again["choices"] == first["choices"]
    assert singles_after_first <= len(distinct) and len(decoded) == singles_after_first


def test_grammar_matchers_are_built_off_the_engine_thread(srv) -> None:
    built_on: list[str] = []
    init = structured.GrammarState.__init__

    def recording_init(self, compiled):
        built_on.append(threading.current_thread().name)
        init(self, compiled)

    structured.GrammarState.__init__ = recording_init
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "n": 3,
        "response_format": {"type": "json_object"},
    }
    try:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    finally:
        structured.GrammarState.__init__ = init
    assert r.status_code == 200 and len(built_on) == 3 and "engine-loop" not in built_on


def test_grammar_masks_are_filled_in_one_batched_call(monkeypatch) -> None:
    tokenizer = byte_tokenizer()
    calls = {"row": 0, "batch": 0}
    row_fill, batch_fill = llguidance.torch.fill_next_token_bitmask, llguidance.torch.fill_next_token_bitmask_par
    monkeypatch.setattr(
        llguidance.torch,
        "fill_next_token_bitmask",
        lambda *a, **k: (calls.__setitem__("row", calls["row"] + 1), row_fill(*a, **k))[1],
    )
    monkeypatch.setattr(
        llguidance.torch,
        "fill_next_token_bitmask_par",
        lambda *a, **k: (calls.__setitem__("batch", calls["batch"] + 1), batch_fill(*a, **k))[1],
    )
    params = SamplingParams(max_tokens=8, temperature=0, structured=StructuredSpec.choice(["yes", "no"]))
    seqs = [SequenceState(f"r-{i}", "r", i, [1], params, eos_token_ids=(2,)) for i in range(4)]
    manager = StructuredOutputManager(tokenizer)
    manager.add(seqs, manager.new_matchers(params, len(seqs)))
    for _ in range(2):
        logits = torch.randn(4, len(tokenizer))
        tokens = [r.token_id for r in sample(logits, seqs, manager.grammar_masks(seqs, len(tokenizer)))]
        for seq, token in zip(seqs, tokens):
            seq.output_token_ids.append(token)
    text = [tokenizer.decode(seq.output_token_ids) for seq in seqs]
    assert calls == {"row": 0, "batch": 2} and all(t in ("ye", "no") for t in text)


def test_grammar_cache_is_bounded_by_text_size() -> None:
    """Schemas of ~40 kB each into a 200 kB cache: the oldest go, the newest stay, the total holds."""
    compiler = structured.GrammarCompiler(byte_tokenizer(), cache_chars=200_000)
    specs = [StructuredSpec.json_schema({"type": "object", "description": f"{i}" + "x" * 40_000}) for i in range(10)]
    for spec in specs:
        compiler.compile(spec)
    assert compiler.cache.chars <= 200_000 and 2 <= len(compiler.cache) <= 5
    assert compiler.cache.get(specs[-1]) is not None and compiler.cache.get(specs[0]) is None
    assert structured.CACHE_CHARS == 64 * 2**20


def test_validation_error_keeps_a_surrogate_encodable() -> None:
    err = validation_error([{"type": "extra_forbidden", "loc": ("\ud800",), "msg": "x"}])
    from server.api.errors import error_response

    assert b"\\\\ud800" in error_response(err).body
