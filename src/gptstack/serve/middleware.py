"""The middleware, outermost first: API-key check with request log and metric, then the body-size
bound. Both are pure ASGI rather than BaseHTTPMiddleware, so that ``request.is_disconnected()``
in a route still sees the client go away."""

from __future__ import annotations

import functools
import json
import logging
import time

from fastapi import FastAPI

from .schemas import error_body
from .security import BodyLimitMiddleware
from .state import ServerState

log = logging.getLogger("gptstack.serve")


async def send_json(send, status: int, body: dict) -> None:
    """Answer from inside the middleware, before any route has run."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def presented_key(scope) -> str:
    """The key from ``Authorization: Bearer <key>``, else from ``X-API-Key``."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get(b"x-api-key", b"").decode("latin-1")


class AuthAndLogMiddleware:
    """401 to a request outside the public paths without a valid key; every request, refused or not,
    is logged (by key id, never the key) and counted by route and status. Routes find the key id
    in ``request.state.key_id`` for the rate limits."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    def key_id(self, path: str, scope) -> str | None:
        config = self.state.config
        if config.auth and path not in config.public_paths:
            return config.keys.match(presented_key(scope))
        return "anonymous"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, status = time.perf_counter(), scope["path"], 0
        key_id = self.key_id(path, scope)
        scope.setdefault("state", {})["key_id"] = key_id

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if key_id is None:
            self.state.metrics.count_error(401)
            await send_json(tracked_send, 401, error_body("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                                          "authentication_error", code="invalid_api_key"))
        else:
            await self.app(scope, receive, tracked_send)
        self.state.metrics.requests.labels(route=path, status=str(status)).inc()
        log.info("%s %s -> %d in %.3fs key=%s", scope["method"], path, status, time.perf_counter() - started,
                 key_id or "invalid")


async def reject_large_body(state: ServerState, scope, send) -> None:
    state.metrics.count_error(413)
    await send_json(send, 413, error_body(f"request body over {state.config.max_body_bytes} bytes",
                                          code="body_too_large"))


def install_middleware(app: FastAPI, state: ServerState) -> None:
    # the last added runs first
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_body_bytes,
                       reject=functools.partial(reject_large_body, state))
    app.add_middleware(AuthAndLogMiddleware, state=state)
