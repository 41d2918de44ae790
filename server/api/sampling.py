"""Request fields -> the engine's SamplingParams and the detokenizer's OutputOptions."""

from __future__ import annotations

from server.api.detokenize import OutputOptions
from server.api.errors import APIError
from server.api.protocol import SamplingFields
from server.api.serving import ServingContext
from server.engine.request import SamplingParams, SamplingParamsError


def check_token_ids(ctx: ServingContext, ids: list[int], param: str) -> None:
    vocab = len(ctx.tokenizer)
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


def sampling_params(ctx: ServingContext, req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    check_token_ids(ctx, req.stop_token_ids or [], "stop_token_ids")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        seed=req.seed,
        n=req.n,
        logprobs=logprobs,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
    )
    try:
        params.validate()
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    return params
