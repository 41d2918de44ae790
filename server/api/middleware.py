"""ASGI middleware that runs before a request body is read: the API key check, and the body's
size limit and deadline. Both answer in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_body

PUBLIC_PATHS = frozenset(
    {"/health", "/ready", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
    (RFC 7235)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class AuthMiddleware:
    """401 unless the request carries the API key, on every path but PUBLIC_PATHS, checked
    before the body is read or parsed."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = bearer_token(header)
        if token is not None and hmac.compare_digest(token.encode("latin-1"), self.api_key):
            return await self.app(scope, receive, send)
        body = error_body(401, "Invalid or missing API key.", code="invalid_api_key")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, by Content-Length or by counting a chunked body; 408
    for a body that has not fully arrived `timeout` seconds after its headers."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            message = f"Request body is larger than {self.max_bytes} bytes."
            return await JSONResponse(error_body(413, message), 413)(scope, receive, send)
        received, complete, deadline = 0, False, asyncio.get_running_loop().time() + self.timeout

        async def counting_receive():  # FastAPI re-raises HTTPExceptions from body reading
            nonlocal received, complete
            if complete:  # past the body: waiting for a disconnect has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise HTTPException(408, f"The request body did not arrive within {self.timeout:g} s.") from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.max_bytes:
                raise HTTPException(413, f"Request body is larger than {self.max_bytes} bytes.")
            return message

        await self.app(scope, counting_receive, send)
