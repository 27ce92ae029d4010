"""Every error leaves the server in the dialect of the route it hit: OpenAI's error object under /v1, ollama's
`{"error": "..."}` elsewhere. GdsllmError subclasses keep their status and message (+ hint)."""

import logging
import re

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from gdsllm_core.errors import ContextOverflowError, GdsllmError, InvalidFieldError, ModelNotFoundError
from gdsllm_core.server import urls
from gdsllm_core.server.schemas import OllamaError, OpenAIError, OpenAIErrorBody

log = logging.getLogger("gdsllm.server")


UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")  # msgspec's message for a field the Struct does not list
ERROR_DESCRIPTIONS = {400: "a field is missing, of the wrong type or out of range; the prompt exceeds the context",
                      401: "GDSLLM_API_TOKEN is set and the bearer token is missing or wrong",
                      404: "the model is not in the store", 500: "the engine failed"}
OLLAMA_ERRORS = {status: ResponseSpec(OllamaError, description=text) for status, text in ERROR_DESCRIPTIONS.items()}
OPENAI_ERRORS = {status: ResponseSpec(OpenAIError, description=text) for status, text in ERROR_DESCRIPTIONS.items()}


def is_openai_path(path: str) -> bool:
    return path == urls.OPENAI_PREFIX or path.startswith(urls.OPENAI_PREFIX + "/")


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """The JSON error body for `path`'s dialect (also written into streams that fail after their first byte)."""
    if is_openai_path(path):
        return msgspec.json.encode(OpenAIError(OpenAIErrorBody(message, _openai_type(status), param, code)))
    return msgspec.json.encode(OllamaError(message))


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(request.url.path, status, message, param, code), status_code=status,
                    media_type=MediaType.JSON, headers=headers)


def openai_code(exc: GdsllmError) -> tuple[str | None, str | None]:
    """(param, code) for OpenAI's error object."""
    if isinstance(exc, ModelNotFoundError):
        return "model", "model_not_found"
    if isinstance(exc, ContextOverflowError):
        return "messages", "context_length_exceeded"
    if isinstance(exc, InvalidFieldError):
        return exc.param, "invalid_value"
    return None, None


def handle_gdsllm_error(request: Request, exc: GdsllmError) -> Response:
    if exc.http_status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    param, code = openai_code(exc)
    return error_response(request, exc.http_status, str(exc), param, code)


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code >= 500:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    message, param = exc.detail, None
    if isinstance(exc, ValidationException) and exc.extra:
        problems = [p if isinstance(p, dict) else {"message": str(p)}
                    for p in (exc.extra if isinstance(exc.extra, list) else [exc.extra])]
        param = problems[0].get("key")
        message = "invalid request body: " + "; ".join(
            (f"field `{p['key']}`: " if p.get("key") else "") + str(p.get("message", p)) for p in problems)
        unknown = UNKNOWN_FIELD.search(str(problems[0].get("message", "")))
        if unknown:
            param = ".".join(part for part in (unknown_parent(param), unknown.group(1)) if part)
            message = (f"field `{param}` is not supported by gdsllm (it is refused rather than ignored); "
                       "leave it out")
    code = "invalid_api_key" if isinstance(exc, NotAuthorizedException) else None
    return error_response(request, exc.status_code, message, param, code, headers=exc.headers)


def unknown_parent(key: str | None) -> str:
    """The path of the object holding an unknown field, from litestar's key ("data", "data.messages[0]", ...)."""
    return "" if key in (None, "data") else key.removeprefix("data.")


def handle_internal_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(request, 500, f"internal server error: {type(exc).__name__}: {exc}")


EXCEPTION_HANDLERS = {
    GdsllmError: handle_gdsllm_error,
    HTTPException: handle_http_exception,
    Exception: handle_internal_error,
}
