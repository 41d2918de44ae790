"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code; also a pydantic error type in protocol

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


_DESCRIPTIONS = {
    400: "Invalid request",
    401: "Missing or invalid API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "Too many requests waiting",
    500: "Internal error",
    503: "Model loading or server shutting down",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error response, in OpenAI's shape."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The error object; text echoed from the request (a field name, a model name) may hold lone
    surrogates, which no response can encode: they are written as `\\udXXX` escapes."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": encodable(message), "type": kind, "param": encodable(param), "code": code}}


def encodable(text: str | None) -> str | None:
    """`text` with lone surrogates replaced by their escapes (valid UTF-8 once encoded)."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers)


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 for pydantic's errors of a request body (`loc` starts at the body's fields): the
    unsupported fields, or else the first error. A context-length error keeps its code."""
    extra = [_path(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        return APIError(400, f"Unsupported parameter(s): {', '.join(extra)}", param=extra[0])
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid" or not first["loc"]:
        return APIError(400, f"Invalid JSON body: {first['msg']}", code="invalid_json")
    param = _path(first["loc"])
    if first["type"] == CONTEXT_LENGTH_EXCEEDED:
        return APIError(400, first["msg"], param=param, code=CONTEXT_LENGTH_EXCEEDED)
    return APIError(400, f"{param}: {first['msg']}", param=param)


def _path(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error([{**e, "loc": e["loc"][1:]} for e in exc.errors()]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = f"req-{uuid.uuid4().hex}"
        logger.error("request %s on %s failed", request_id, request.url.path, exc_info=exc)
        message = f"The server had an error while processing your request (request id {request_id})."
        return JSONResponse(error_body(500, message, code="internal_error"), 500)
