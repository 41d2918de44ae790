"""The FastAPI app: routes, admission, readiness, metrics, the OpenAPI schema and graceful
shutdown. The API key check and the body limit run first, as ASGI middleware."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from logquant.policy import sink_tokens_of
from server.api.chat import create_chat_completion
from server.api.completions import create_completion
from server.api.errors import APIError, error_responses, install_error_handlers
from server.api.info import BODY_MODELS, info_routes
from server.api.intake import accept, add_body_schemas, json_body, read_request
from server.api.middleware import AuthMiddleware, BodyLimitMiddleware
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.sampling import generation_defaults, vocab_width
from server.api.serving import ServingContext
from server.config import ServerSettings
from server.engine.async_engine import AsyncEngine
from server.engine.core import EngineCore
from server.engine.request import SamplingParams
from server.engine.streams import EngineDeadError
from server.metrics import Metrics

logger = logging.getLogger(__name__)
WATCHDOG_INTERVAL = 1.0  # seconds between the watchdog's looks at the engine (at most)
ENGINE_STOPPED = "The engine stopped; the server is restarting."
SSE_EVENT = {  # one server-sent event (OpenAPI's generic text/event-stream item)
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk or error object; last, [DONE]"},
        "event": {"type": "string", "enum": ["message"]},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
COMPLETION_RESPONSES = {
    200: {
        "description": "A completion; with `stream: true`, server-sent events ending in `data: [DONE]`",
        "content": {"application/json": {}, "text/event-stream": {"schema": SSE_EVENT}},
    },
    **error_responses(400, 401, 404, 413, 429, 500, 503),
}


@dataclass
class AppState:
    settings: ServerSettings
    ctx: ServingContext | None = None
    metrics: Metrics | None = None
    load_failed: bool = False
    engine_failure: str | None = None  # why a loaded engine stopped serving (the watchdog)
    fatal_error: str | None = None  # one line: why the server cannot start or go on
    on_fatal: Callable[[str], None] | None = None  # told `fatal_error` (the CLI stops the server)
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None

    def start_draining(self) -> None:
        """On SIGTERM (from any thread): refuse new requests (503) and, after the grace period,
        end those still running with a 503 `server_shutting_down`."""
        self.draining = True
        if self.loop is not None:
            grace = self.settings.shutdown_grace_seconds
            self.loop.call_soon_threadsafe(self.loop.call_later, grace, self._end_running)

    def _end_running(self) -> None:
        if self.ctx is not None:
            logger.warning("shutdown grace period over: ending the requests still running")
            self.ctx.engine.end_all_requests()


def create_app(
    settings: ServerSettings,
    core_factory: Callable[[], EngineCore] | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """`core_factory` builds the engine core (default: load `settings.model`); it runs in a
    thread after start-up, so /health answers while the model loads and /ready says 503.
    If it fails, `on_fatal` gets one line saying why (the CLI then exits non-zero)."""
    state = AppState(settings, on_fatal=on_fatal)
    factory = core_factory or (lambda: EngineCore.from_config(settings.engine_config()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        loader = asyncio.create_task(_load(state, factory))
        yield
        loader.cancel()
        if state.ctx is not None:
            await asyncio.to_thread(state.ctx.engine.shutdown)
            state.ctx.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="logquant-serve", version=importlib.metadata.version("logquant-serve"), lifespan=lifespan)
    app.state.logquant = state
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.timeout_request_body)
    if settings.api_key is not None:
        app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:  # outermost: preflight requests are answered without a key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _add_routes(app, state)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 responses: validation errors are 400s here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        add_body_schemas(schema, [ChatCompletionRequest, CompletionRequest, *BODY_MODELS])
        app.openapi_schema = schema
    return app.openapi_schema


async def _load(state: AppState, factory: Callable[[], EngineCore]) -> None:
    """Load and start the engine, then watch it for as long as the server runs."""
    try:
        state.ctx, state.metrics = await _start_engine(state.settings, factory)
    except (ValueError, MemoryError, OSError) as exc:  # the settings do not fit the model or the machine
        _fail(state, str(exc))
        return
    except Exception as exc:
        logger.exception("model failed to load")
        _fail(state, f"the model failed to load: {type(exc).__name__}: {exc}")
        return
    await _watch(state, state.ctx.engine)


async def _watch(state: AppState, engine: AsyncEngine) -> None:
    """The watchdog: once the engine cannot serve (its thread died, or a step outlived
    --step-timeout), /health and /ready say 503, every waiting request ends with a 503
    `engine_dead`, and the server stops with exit code 1 so that it is restarted."""
    interval = min(WATCHDOG_INTERVAL, state.settings.step_timeout / 4)
    while (reason := engine.failure()) is None:
        await asyncio.sleep(interval)
    logger.critical("engine failure: %s; failing its requests and stopping", reason)
    state.engine_failure = reason
    engine.fail_all_requests(EngineDeadError("the engine is not running"))
    _fail(state, reason)


async def _start_engine(s: ServerSettings, factory: Callable[[], EngineCore]) -> tuple[ServingContext, Metrics]:
    """Build the core, start the engine loop and run one warm-up request through it."""
    core = await asyncio.to_thread(factory)
    sampling_defaults = generation_defaults(core.model, s.generation_config)
    sinks = sink_tokens_of(core.layout.policy)
    cache_info = {
        "policy": s.policy,
        "fp_budget": str(s.fp_budget),
        "group_size": str(s.group_size),
        "sink_tokens": str(sinks),
        "key_fp_channels": str(s.key_fp_channels),
        "kv_bits": str(s.kv_bits),
        "dtype": str(core.dtype).removeprefix("torch."),
        "device": str(core.device),
    }
    metrics = Metrics(s.model_name, core.max_model_len, cache_info)
    engine = AsyncEngine(core, metrics.on_step, s.stream_buffer_tokens, s.stream_stall_timeout, s.step_timeout)
    engine.start()
    try:
        async for _ in engine.generate("warmup", [0, 1, 2], SamplingParams(max_tokens=2, temperature=0)):
            pass
    except Exception:
        await asyncio.to_thread(engine.shutdown)
        raise
    fingerprint = f"{s.policy}-fp{s.fp_budget}-g{s.group_size}"
    fingerprint += (f"-s{sinks}" if sinks else "") + (f"-k{s.key_fp_channels}" if s.key_fp_channels else "")
    fingerprint += f"-b{s.kv_bits}" if s.kv_bits != 2 else ""
    ctx = ServingContext(
        engine,
        core.tokenizer,
        s.model_name,
        core.max_model_len,
        s.max_waiting_requests,
        fingerprint,
        vocab_width(core.model, core.tokenizer),
        s.max_sequences_per_request,
        s.max_response_bytes,
        s.log_prompts,
        s.max_log_len,
        sampling_defaults=sampling_defaults,
    )
    logger.info(
        "ready: %s (%s, KV %.1f MiB, %d pages)",
        s.model_name,
        fingerprint,
        core.kv_manager.capacity_bytes / 2**20,
        core.kv_manager.num_pages,
    )
    return ctx, metrics


def _fail(state: AppState, reason: str) -> None:
    state.load_failed = True
    state.fatal_error = " ".join(reason.split())  # one line
    logger.error("cannot start: %s", state.fatal_error)
    if state.on_fatal is not None:
        state.on_fatal(state.fatal_error)


def _num_prompts(prompt: object) -> int:
    """A completions prompt: one text or token-id list, or a list of them."""
    return len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1


def _add_routes(app: FastAPI, state: AppState) -> None:
    def serving() -> ServingContext:
        if state.engine_failure is not None:
            raise APIError(503, ENGINE_STOPPED, code="engine_dead")
        if state.draining:
            raise APIError(503, "The server is shutting down.", code="server_shutting_down")
        if state.ctx is None:
            loading = "The model failed to load; see the server log." if state.load_failed else "The model is loading."
            raise APIError(503, loading, code="model_not_ready")
        return state.ctx

    @app.post("/v1/chat/completions", responses=COMPLETION_RESPONSES, openapi_extra=json_body(ChatCompletionRequest))
    async def chat(raw: Request):
        ctx = serving()
        req = await read_request(ctx, raw, ChatCompletionRequest, ("messages",))
        return await accept(ctx, req.n, lambda: create_chat_completion(ctx, req, raw))

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES, openapi_extra=json_body(CompletionRequest))
    async def completions(raw: Request):
        ctx = serving()
        req = await read_request(ctx, raw, CompletionRequest, ("prompt",))
        return await accept(ctx, req.n * _num_prompts(req.prompt), lambda: create_completion(ctx, req, raw))

    # models, tokenize, detokenize, version (the API key is checked by AuthMiddleware)
    app.include_router(info_routes(serving, state.settings.model))

    @app.get("/health", responses=error_responses(503))
    async def health() -> dict:
        """Liveness: 200 while the model loads and serves; 503 once the engine has failed."""
        if state.engine_failure is not None:
            raise APIError(503, ENGINE_STOPPED, code="engine_dead")
        return {"status": "ok"}

    @app.get("/ready", responses=error_responses(503))
    async def ready() -> dict:
        serving()
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body = generate_latest(state.metrics.registry) if state.metrics else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)
