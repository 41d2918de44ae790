"""What a model's attention layers do, read from its transformers config, and what we refuse.

`attention_spec(config)` returns each layer's kind (full attention, or a sliding window of W
positions: a query at position q sees keys q - W + 1 .. q, transformers' definition), the
attention logit softcap (Gemma 2) and whether layers have learned sink logits (gpt-oss). It
raises `UnsupportedModelError`, one line naming the model type and the feature, for anything
our attention cannot run exactly: encoder-decoder models, cross-attention, multi-latent
attention, linear / state-space / convolution / chunked layers, bidirectional attention, and
model types that no test covers. Layer kinds come from transformers' own reading of the
config (`get_layer_types_and_kwargs`, the one DynamicCache uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

# Model types whose attention we run and test (tests/tiny.py, tests/test_attention_kinds.py,
# the real Gemma 3 270M and SmolLM2 tests). README "Supported models" lists them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "gpt_oss")
FULL, SLIDING = "full_attention", "sliding_attention"
# Config fields that announce a feature we cannot run, with the feature's name.
_FEATURE_FIELDS = {
    "kv_lora_rank": "multi-latent attention (MLA)",
    "q_lora_rank": "multi-latent attention (MLA)",
    "cross_attention_layers": "cross-attention layers",
    "attention_chunk_size": "chunked attention",
    "layers_block_type": "state-space / linear attention layers",
    "linear_num_value_heads": "linear attention layers",
    "mamba_d_state": "state-space (Mamba) layers",
    "state_size": "state-space layers",
    "kv_sharing_modes": "KV cache sharing between layers",
    "vision_config": "a vision-language model (serve its text-only checkpoint)",
    "audio_config": "an audio-language model",
}


class UnsupportedModelError(ValueError):
    """The model's attention is not one we can run exactly (the message is one line)."""


@dataclass(frozen=True)
class AttentionSpec:
    model_type: str
    windows: tuple[int | None, ...]  # per layer: sliding window W, or None for full attention
    softcap: float | None = None  # attention logits -> tanh(logits / softcap) * softcap
    sinks: bool = False  # learned per-head sink logits in the softmax denominator


def _refuse(model_type: str, feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"model type {model_type!r} is not supported: {feature}")


def _check_features(config: PretrainedConfig, text: PretrainedConfig, model_type: str) -> None:
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise _refuse(model_type, "an encoder-decoder model")
    if getattr(text, "add_cross_attention", False):
        raise _refuse(model_type, "cross-attention")
    for name, feature in _FEATURE_FIELDS.items():
        if getattr(text, name, None) or getattr(config, name, None):
            raise _refuse(model_type, feature)
    if getattr(text, "use_bidirectional_attention", False):
        raise _refuse(model_type, "bidirectional attention")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _refuse(
            model_type, f"not an architecture we run and test (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _windows(text: PretrainedConfig, model_type: str) -> tuple[int | None, ...]:
    """Per layer: its window, or None. A window of at least every position the model has
    never hides a key, so it is full attention."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    positions = getattr(text, "max_position_embeddings", None)
    windows: list[int | None] = []
    for kind, kwargs in zip(layer_types, layer_kwargs):
        if kind not in (FULL, SLIDING):
            raise _refuse(model_type, f"{kind} layers")
        window = kwargs.get("sliding_window") if kind == SLIDING else None
        if kind == SLIDING and not (isinstance(window, int) and window >= 1):
            raise _refuse(model_type, f"a sliding-window layer without a window size ({window!r})")
        windows.append(None if window is None or (positions and window >= positions) else window)
    if len(windows) != text.num_hidden_layers:
        raise _refuse(model_type, f"{len(windows)} layer types for {text.num_hidden_layers} layers")
    return tuple(windows)


def attention_spec(config: PretrainedConfig) -> AttentionSpec:
    """The attention of `config`'s decoder; raises UnsupportedModelError (one line)."""
    text = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", None) or "unknown"
    _check_features(config, text, model_type)
    softcap = getattr(text, "attn_logit_softcapping", None)
    return AttentionSpec(
        model_type=model_type,
        windows=_windows(text, model_type),
        softcap=float(softcap) if softcap else None,
        sinks=model_type == "gpt_oss",
    )
