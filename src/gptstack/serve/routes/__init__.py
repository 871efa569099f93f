"""The HTTP routes, one module per kind of request, as plain functions that find the server's
state in ``app.state.server``; ``add_routes`` is the whole API surface in one table."""

from __future__ import annotations

import functools

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from . import chat, classify, completions, embeddings, ner, operations, tokens


def add_routes(app: FastAPI) -> None:
    """Added to the app itself, not through an included APIRouter: newer FastAPI keeps an included
    router as one opaque entry of ``app.routes``, and the auth test walks that table."""
    get = functools.partial(app.add_api_route, methods=["GET"])
    post = functools.partial(app.add_api_route, methods=["POST"])
    get("/health", operations.health)
    get("/ready", operations.ready)
    get("/metrics", operations.prometheus)
    get("/", operations.playground, response_class=HTMLResponse)
    get("/playground", operations.playground, response_class=HTMLResponse)
    get("/v1/models", operations.models)
    post("/tokenize", tokens.tokenize)
    post("/detokenize", tokens.detokenize)
    post("/v1/classify", classify.classify)
    post("/v1/ner", ner.ner)
    post("/v1/completions", completions.completions)
    post("/v1/chat/completions", chat.chat_completions)
    post("/v1/embeddings", embeddings.embeddings)
