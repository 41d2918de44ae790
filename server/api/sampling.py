"""Request fields -> the engine's SamplingParams and the detokenizer's OutputOptions, with
sampling defaults from the model's generation_config for the fields a request leaves out."""

from __future__ import annotations

import logging

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from server.api.detokenize import OutputOptions
from server.api.errors import APIError
from server.api.protocol import SamplingFields
from server.api.serving import ServingContext
from server.engine.request import SamplingParams, SamplingParamsError, StructuredSpec

logger = logging.getLogger(__name__)
# generation_config keys that set a default (vLLM's list); max_new_tokens is our max_tokens
DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def generation_defaults(model: PreTrainedModel, source: str) -> dict[str, float | int]:
    """Sampling defaults by `--generation-config`: "auto" reads the model's generation_config,
    "vllm" uses neutral values, anything else is a directory holding generation_config.json.
    Only the values the config sets (those that differ from transformers' defaults) count."""
    if source == "vllm":
        return {}
    config = model.generation_config if source == "auto" else GenerationConfig.from_pretrained(source)
    given = config.to_diff_dict()
    defaults = {ours: given[key] for key, ours in DEFAULT_KEYS.items() if given.get(key) is not None}
    try:
        SamplingParams(**defaults).validate()  # type: ignore[arg-type]
    except SamplingParamsError as exc:
        raise ValueError(f"the generation config's {exc} (use --generation-config vllm to ignore it)") from exc
    if defaults:
        logger.info("sampling defaults from the model's generation config: %s", defaults)
    return defaults


def vocab_width(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """How many token ids are valid: the tokenizer's, the embedding's and the logits' sizes,
    whichever is smallest (models often pad their embedding; a few have fewer rows)."""
    sizes = [len(tokenizer), model.config.get_text_config(decoder=True).vocab_size]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    sizes += [embedding.num_embeddings] if isinstance(embedding, torch.nn.Embedding) else []
    sizes += [head.out_features] if isinstance(head, torch.nn.Linear) else []
    return min(sizes)


def check_token_ids(ctx: ServingContext, ids: list[int], param: str) -> None:
    """Ids must index the tokenizer and the model's embedding and logits (`vocab_width`)."""
    vocab = ctx.vocab_width
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is not in the vocabulary [0, {vocab})", param=param)


def check_stream_options(req: SamplingFields) -> None:
    options = req.stream_options
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise APIError(400, "continuous_usage_stats requires include_usage", param="stream_options")


def output_options(req: SamplingFields) -> OutputOptions:
    return OutputOptions(
        stops=tuple(req.stop or ()),
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
    )


def sampling_params(
    ctx: ServingContext, req: SamplingFields, max_tokens: int, logprobs: int | None, structured: StructuredSpec | None
) -> SamplingParams:
    """`max_tokens`: what the request asked for, or else the room left in the context (then
    capped by the generation config's max_new_tokens). `structured`: a compiled constraint."""
    check_token_ids(ctx, req.stop_token_ids or [], "stop_token_ids")
    logit_bias = {int(token): bias for token, bias in (req.logit_bias or {}).items()}
    check_token_ids(ctx, list(logit_bias), "logit_bias")
    defaults = {**NEUTRAL, **ctx.sampling_defaults}
    if _requested_max_tokens(req) is None and "max_tokens" in defaults:
        max_tokens = min(max_tokens, int(defaults["max_tokens"]))

    def pick(name: str) -> float | int:
        value = getattr(req, name)
        return defaults[name] if value is None else value

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(pick("temperature")),
        top_p=float(pick("top_p")),
        top_k=int(pick("top_k")),
        min_p=float(pick("min_p")),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=float(pick("repetition_penalty")),
        seed=req.seed,
        n=req.n,
        logprobs=logprobs,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logit_bias=logit_bias,
        min_tokens=req.min_tokens,
        structured=structured,
    )
    try:
        params.validate()
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    return params


def _requested_max_tokens(req: SamplingFields) -> int | None:
    return getattr(req, "max_completion_tokens", None) or req.max_tokens
