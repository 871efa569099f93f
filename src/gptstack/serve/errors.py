"""Errors leave in the OpenAI shape ``{"error": {message, type, param, code}}``, never as a traceback.

Routes raise ``APIError``; the handlers installed here turn it, FastAPI's validation and HTTP errors
and anything unexpected into that shape, counting each in the error metric.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.engine import EngineStopped, QueueFull, RequestFailed
from .schemas import error_body
from .state import server_state

log = logging.getLogger("gptstack.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def overloaded(reason: Exception) -> APIError:
    """The engine's queue is full, or it stopped (shutting down, failed, its replica died): either
    way worth a retry in a moment, and the message says which."""
    if isinstance(reason, QueueFull):
        return APIError(503, f"the server is at capacity ({reason}); retry shortly", "server_overloaded",
                        code="overloaded", headers={"Retry-After": "1"})
    return APIError(503, f"{reason}; retry the request", "server_error", code="engine_stopped",
                    headers={"Retry-After": "1"})


def engine_error(reason: Exception) -> APIError:
    """A request the engine refused (503, see ``overloaded``) or failed alone: a fault in the
    server, so a 500 whose message names the request (the log line with the traceback names it
    too) and keeps the fault's own words, internal detail, out of the answer."""
    if isinstance(reason, RequestFailed):
        return APIError(500, str(reason), "server_error", code="request_failed")
    return overloaded(reason)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def counted_error(request: Request, status: int, message: str, *args, **kwargs) -> JSONResponse:
    server_state(request).metrics.count_error(status)
    return error_response(status, message, *args, **kwargs)


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return counted_error(request, exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


# a union's branch in an error's location (pydantic names it by type: "str", "list[constrained-str]")
UNION_BRANCH = re.compile(r"^(constrained-)?(str|int|float|bool|list|dict)$|\[")


def telling_error(errors: list[dict]) -> dict:
    """The first problem, preferring (among a union's branches, which each report one) one that says
    what the value lacks ("at least 1 item") over one that only says it is another type."""
    return min(errors, key=lambda e: e.get("type", "").endswith("_type"))


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One problem, named by its place in the body (``messages.0.role``)."""
    first = telling_error(exc.errors())
    if first.get("type") == "json_invalid":
        return counted_error(request, 400, "the request body is not valid JSON (or not UTF-8): "
                             f"{first.get('ctx', {}).get('error', first.get('msg'))}", code="invalid_json")
    location = ".".join(str(p) for p in first.get("loc", ())[1:]
                        if not (isinstance(p, str) and UNION_BRANCH.search(p))) or "body"
    message = f"{location}: {first.get('msg')}"
    if first.get("type") == "extra_forbidden":
        message = f"unknown parameter {location!r}"
    return counted_error(request, 400, message, param=location)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:   # FastAPI could not read the body at all (e.g. not UTF-8)
        return counted_error(request, 400, f"the request body could not be parsed ({exc.detail}); send UTF-8 JSON",
                             code="invalid_json")
    return counted_error(request, exc.status_code, str(exc.detail), code=str(exc.status_code),
                         headers=exc.headers)     # a 405's Allow, for one


async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
    """The engine refused (queue full, stopping), was lost mid-request (a replica died) or failed
    this one request."""
    return await on_api_error(request, engine_error(exc))


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return counted_error(request, 500, "internal error; the server log has the details", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for engine_exception in (QueueFull, EngineStopped, RequestFailed):
        app.add_exception_handler(engine_exception, on_engine_error)
    app.add_exception_handler(Exception, on_unexpected_error)
