"""/openapi.json as the server behaves, since users generate clients from it: errors documented as
they are sent (OpenAI's error shape, 400 rather than FastAPI's 422), per route only those it can
send; /metrics as Prometheus text; token ids bounded by this model's vocabulary; and only the task
routes (classify, NER) that this checkpoint's head serves."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .state import ServerState

ERRORS = {
    400: "The request is invalid: a field, its value or the body (the message names what and how to fix it)",
    401: "No API key, or one this server does not know (send Authorization: Bearer <key>)",
    404: "The model named is not the one this server serves",
    413: "The body is larger than the server accepts",
    429: "The API key's rate limit is reached (Retry-After says when to retry)",
    503: "The server is at capacity, still loading, or its engine stopped (retry shortly)",
}
MODEL_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/ner"}
ERROR_SCHEMA = {
    "title": "ErrorResponse", "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def route_errors(path: str, method: str, state: ServerState) -> list[int]:
    """The error statuses ``method path`` can answer with."""
    config = state.config
    errors = [] if path in config.public_paths or not config.auth else [401]
    if method == "post":
        errors += [400, 404, 413]
    if path in MODEL_ROUTES:
        errors += [429, 503]
    if path == "/ready":
        errors.append(503)
    return errors


def bound_token_ids(node, vocab_size: int) -> None:
    """Every schema marked as a token id gets this model's vocabulary as its maximum."""
    if isinstance(node, dict):
        if node.pop("x-token-id", False):
            node["maximum"] = vocab_size - 1
        for value in node.values():
            bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            bound_token_ids(value, vocab_size)


def install_openapi(app: FastAPI, state: ServerState) -> None:
    def document() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    responses = operation["responses"]
                    responses.pop("422", None)    # validation errors are 400s in OpenAI's shape
                    for status in route_errors(path, method, state):
                        responses[str(status)] = {"description": ERRORS[status],
                                                  "content": {"application/json": {"schema": error_ref}}}
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            components["ErrorResponse"] = ERROR_SCHEMA
            bound_token_ids(schema, state.tokenizer.vocab_size)
            embeddings = schema["components"]["schemas"]["EmbeddingRequest"]["properties"]["dimensions"]
            embeddings["anyOf"] = [{"const": state.backend.model_config.n_embd}, {"type": "null"}]   # the width, or unset
            for body in schema["components"]["schemas"].values():    # what to name: the model served
                if "model" in body.get("properties", {}):
                    body["properties"]["model"]["examples"] = [state.config.model_name]
            # the task routes this checkpoint cannot serve are left out (they answer 400 saying so)
            for path, served in (("/v1/classify", state.backend.labels), ("/v1/ner", state.backend.tagger)):
                if not served:
                    schema["paths"].pop(path, None)
            metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]
            metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
            metrics["description"] = "Prometheus text exposition format"
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = document
