"""`SamplingParams.prompt_logprobs`: the log-prob of every prompt token given the ones before
it, computed by the prefill chunks themselves (what `python -m logquant.eval ppl --engine` reads)."""

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from server.engine import LLM, SamplingParams
from server.engine.request import SamplingParamsError

PROMPTS = ["The quick brown fox jumps over the lazy dog", "0123456789" * 6, "hello there", "abcdefgh" * 7]


def reference(prompt_ids: list[int]) -> torch.Tensor:
    """[T - 1, vocab] next-token log-probs of one full forward (16-bit, no cache)."""
    with torch.inference_mode():
        logits = tiny_model()(input_ids=torch.tensor([prompt_ids])).logits[0, :-1]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("kv_pages", [None, 6])
def test_prompt_logprobs_equal_a_full_forward(kv_pages: int | None) -> None:
    """Prompts cut into 8-token chunks and batched together; with 12 pages, preemption makes
    some prefills run twice, and each position is still reported once."""
    probe = LLM(model_object=tiny_model(), tokenizer=byte_tokenizer(), policy="fp16", group_size=8, device="cpu")
    kv = 2 * probe.engine.layout.page_bytes_all_layers * kv_pages if kv_pages else 64 << 20
    llm = LLM(
        model_object=tiny_model(),
        tokenizer=byte_tokenizer(),
        policy="fp16",
        group_size=8,
        device="cpu",
        kv_cache_memory=kv,
        max_num_batched_tokens=16,
        max_num_seqs=8,
        debug_integrity=True,
    )
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=2)
    outputs = llm.generate(PROMPTS, params)
    if kv_pages:
        assert llm.engine.scheduler.num_preemptions > 0
    for out in outputs:
        expected = reference(out.prompt_token_ids)
        entries = out.prompt_logprobs
        assert entries[0] is None and len(entries) == len(out.prompt_token_ids)
        targets = torch.tensor(out.prompt_token_ids[1:])
        got = torch.tensor([e["logprob"] for e in entries[1:]])
        torch.testing.assert_close(got, expected.gather(1, targets[:, None])[:, 0], atol=1e-4, rtol=0)
        top_ids = [[token for token, _ in e["top"]] for e in entries[1:]]
        assert top_ids == expected.topk(2, dim=-1).indices.tolist()


def test_prompt_logprobs_off_by_default_and_checked() -> None:
    llm = LLM(model_object=tiny_model(), tokenizer=byte_tokenizer(), policy="fp16", group_size=8, device="cpu")
    (out,) = llm.generate(["abc"], SamplingParams(max_tokens=2, temperature=0))
    assert out.prompt_logprobs is None
    with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
        llm.generate(["abc"], SamplingParams(max_tokens=2, prompt_logprobs=21))
