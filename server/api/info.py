"""Model cards, tokenizer endpoints and the version: `GET /v1/models`, `GET /v1/models/{id}`,
`POST /tokenize`, `POST /detokenize` (vLLM's shapes) and `GET /version`."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field, ValidationInfo, ValidatorFunctionWrapHandler, field_validator

from server.api.chat_template import render_chat
from server.api.errors import APIError, error_responses
from server.api.intake import accept, json_body, read_request
from server.api.protocol import MAX_TOOLS, Bool, ChatMessage, Int, Strict, Tool, limits_of
from server.api.sampling import check_token_ids
from server.api.serving import ServingContext
from server.api.tools import template_renders_tools

OWNER = "logquant-serve"
# /detokenize takes any sequence of this model and /tokenize's ids of prompts somewhat too long
DETOKENIZE_CONTEXTS = 4


class TokenizeRequest(Strict):
    """vLLM's two request shapes in one model: `prompt` (text) or `messages` (chat)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: Bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    return_token_strs: Bool = False
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None  # rendered where the template does

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        chat_only = {"add_generation_prompt", "continue_final_message", "tools"} & self.model_fields_set
        if self.prompt is not None and chat_only:
            name = sorted(chat_only)[0]
            raise APIError(400, f"{name} applies to messages only", param=name)


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[Annotated[Int, Field(ge=0)]]

    @field_validator("tokens", mode="wrap")
    @classmethod
    def _bounded(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """At most DETOKENIZE_CONTEXTS contexts' worth of ids, refused before they are
        validated: decoding holds the GIL (~0.3 us an id), so this bounds the pause it causes."""
        limits = limits_of(info)
        if limits is not None and isinstance(value, list) and len(value) > DETOKENIZE_CONTEXTS * limits.max_model_len:
            cap = DETOKENIZE_CONTEXTS * limits.max_model_len
            raise ValueError(f"at most {cap} token ids ({DETOKENIZE_CONTEXTS} x the context length) at once")
        return handler(value)


BODY_MODELS = [TokenizeRequest, DetokenizeRequest]  # read by the routes themselves (see intake)
TOKENIZER_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503)


def model_card(ctx: ServingContext, root: str) -> dict:
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": OWNER,
        "root": root,
        "parent": None,
        "max_model_len": ctx.max_model_len,
    }


def check_model(ctx: ServingContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _tokenize(ctx: ServingContext, req: TokenizeRequest) -> dict:
    if req.messages is not None:
        tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
        shown = tools if tools and template_renders_tools(ctx.tokenizer) else None
        text = render_chat(
            ctx.tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message, shown, tokenize=False
        )
        ids = ctx.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        assert req.prompt is not None, "checked by TokenizeRequest"
        ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    body = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(ids)
    return body


def info_routes(serving: Callable[[], ServingContext], model_root: str) -> APIRouter:
    """The routes above; `serving` gives the loaded model (or raises a 503), `model_root` is the
    model path that `root` reports. The API key is checked by AuthMiddleware. Tokenizing and
    detokenizing are admitted like one waiting sequence, with the completion routes' checks."""
    router = APIRouter(responses=error_responses(400, 401, 404, 413, 500, 503))

    @router.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(serving(), model_root)]}

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        ctx = serving()
        check_model(ctx, model_id)
        return model_card(ctx, model_root)

    @router.post("/tokenize", responses=TOKENIZER_ERRORS, openapi_extra=json_body(TokenizeRequest))
    async def tokenize(raw: Request) -> dict:
        ctx = serving()
        req = await read_request(ctx, raw, TokenizeRequest, ("prompt", "messages"))
        check_model(ctx, req.model)
        req.check()
        return await accept(ctx, 1, lambda: ctx.run_tokenizer(_tokenize, ctx, req))

    @router.post("/detokenize", responses=TOKENIZER_ERRORS, openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(raw: Request) -> dict:
        ctx = serving()
        req = await read_request(ctx, raw, DetokenizeRequest, ())
        check_model(ctx, req.model)
        check_token_ids(ctx, req.tokens, "tokens")
        return {"prompt": await accept(ctx, 1, lambda: ctx.run_tokenizer(ctx.tokenizer.decode, req.tokens))}

    @router.get("/version")
    async def version() -> dict:
        return {"version": importlib.metadata.version("logquant-serve")}

    return router
