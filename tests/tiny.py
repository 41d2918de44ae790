"""Tiny random-weight models and a byte-level tokenizer with a chat template, built offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WINDOW = 12  # sliding window of the tiny window models: tests run sequences past 2 * WINDOW
ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "mistral": dict(model_type="mistral"),
    "phi3": dict(model_type="phi3", pad_token_id=0),
    "gemma": dict(model_type="gemma", head_dim=32),
}
# Models with sliding-window layers (and Gemma 2's softcap, gpt-oss's sinks); 2 layers each.
WINDOW_ARCHS = {
    "qwen2_sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral_sliding": dict(model_type="mistral", sliding_window=20),  # every layer: 19 tokens span two pages
    "gemma2": dict(
        model_type="gemma2",
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=WINDOW,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        head_dim=32,
        sliding_window=WINDOW,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2, weight_std: float = 0.15) -> torch.nn.Module:
    tok = byte_tokenizer()
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    kwargs.update((ARCHS | WINDOW_ARCHS)[arch])
    config = AutoConfig.for_model(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger random weights give peaked, input-dependent logits (a flat model makes any
    # perturbation look small and greedy text degenerate).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, weight_std)
    return model.eval()


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, layers: int = 2) -> Path:
    model = tiny_model(arch, seed, layers)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
