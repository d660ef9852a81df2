"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `OpenAIError` (an HTTPException) instead of asserting; `install_error_handlers`
turns it, FastAPI's RequestValidationError (400, not 422, naming the parameter) and any other
HTTPException into that body. `type` is the name of the exception the openai SDK raises for the
status ("BadRequestError", "NotFoundError", ...), as vLLM reports it. `code` is a string or null
as the OpenAI OpenAPI schema requires (vLLM sends the HTTP status as an int there): OpenAI's
slugs where one applies ("model_not_found", "invalid_api_key", "context_length_exceeded").
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")


class OpenAIError(StarletteHTTPException):
    """An error the client gets as an OpenAI error body with `status_code`."""

    def __init__(self, message: str, *, status_code: int = 400, param: str | None = None,
                 type: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.message = message
        self.param = param
        self.type = type or error_type(status_code)
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{name}` does not exist.", status_code=404, param="model",
                       code="model_not_found")


def sse_error(err: OpenAIError) -> bytes:
    """A mid-stream error event (the status is already 200); `data: [DONE]` follows it."""
    return f"data: {json.dumps(err.body())}\n\n".encode()


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        return error_response(OpenAIError(message, status_code=status,
                                          headers=getattr(exc, "headers", None)))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        from pdserve.proxy.protocol import validation_error

        return error_response(validation_error(list(exc.errors())))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(OpenAIError("internal server error", status_code=500))

    app.add_exception_handler(OpenAIError, on_openai_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
