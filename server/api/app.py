"""The FastAPI app: routes, auth, body limit, readiness, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.chat import create_chat_completion
from server.api.completions import create_completion
from server.api.errors import APIError, error_body, install_error_handlers
from server.api.info import info_routes
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.sampling import generation_defaults
from server.api.serving import ServingContext
from server.config import ServerSettings
from server.engine.async_engine import AsyncEngine
from server.engine.core import EngineCore
from server.engine.request import SamplingParams
from server.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: ServerSettings
    ctx: ServingContext | None = None
    metrics: Metrics | None = None
    load_error: str | None = None


def create_app(settings: ServerSettings, core_factory: Callable[[], EngineCore] | None = None) -> FastAPI:
    """`core_factory` builds the engine core (default: load `settings.model`); it runs in a
    thread after start-up, so /health answers while the model loads and /ready says 503."""
    state = AppState(settings)
    factory = core_factory or (lambda: EngineCore.from_config(settings.engine_config()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state, factory))
        yield
        loader.cancel()
        if state.ctx is not None:
            await asyncio.to_thread(state.ctx.engine.shutdown)

    app = FastAPI(title="logquant-serve", lifespan=lifespan)
    app.state.logquant = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    _add_routes(app, state)
    return app


async def _load(state: AppState, factory: Callable[[], EngineCore]) -> None:
    try:
        core = await asyncio.to_thread(factory)
        sampling_defaults = generation_defaults(core.model, state.settings.generation_config)
    except Exception as exc:
        logger.exception("model failed to load")
        state.load_error = str(exc)
        return
    s = state.settings
    cache_info = {"policy": s.policy, "fp_budget": str(s.fp_budget), "group_size": str(s.group_size),
                  "dtype": str(core.dtype).removeprefix("torch."), "device": str(core.device)}  # fmt: skip
    metrics = Metrics(s.model_name, core.max_model_len, cache_info)
    engine = AsyncEngine(core, on_step=metrics.on_step)
    engine.start()
    async for _ in engine.generate("warmup", [0, 1, 2], SamplingParams(max_tokens=2, temperature=0)):
        pass
    fingerprint = f"{s.policy}-fp{s.fp_budget}-g{s.group_size}"
    state.metrics = metrics
    state.ctx = ServingContext(engine, core.tokenizer, s.model_name, core.max_model_len, s.max_waiting_requests,
                               fingerprint, s.log_prompts,
                               sampling_defaults=sampling_defaults)  # fmt: skip
    logger.info("ready: %s (%s, KV %.1f MiB, %d pages)", s.model_name, fingerprint,
                core.kv_manager.capacity_bytes / 2**20, core.kv_manager.num_pages)  # fmt: skip


def _add_routes(app: FastAPI, state: AppState) -> None:
    def serving() -> ServingContext:
        if state.ctx is None:
            raise APIError(503, state.load_error or "the model is still loading")
        return state.ctx

    def authorized(request: Request) -> None:
        key = state.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "Invalid or missing API key.", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(serving(), req, raw)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(serving(), req, raw)

    app.include_router(info_routes(serving, guarded, state.settings.model))  # models, tokenize, version

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        serving()
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        body = generate_latest(state.metrics.registry) if state.metrics else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, by Content-Length or by counting a chunked body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(scope, receive, send, self.max_bytes)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI re-raises HTTPExceptions from body reading
                raise HTTPException(413, f"Request body is larger than {self.max_bytes} bytes.")
            return message

        await self.app(scope, counting_receive, send)


async def _too_large(scope, receive, send, max_bytes: int) -> None:
    response = JSONResponse(error_body(413, f"Request body is larger than {max_bytes} bytes."), 413)
    await response(scope, receive, send)
