"""The OpenAI-compatible HTTP server: a thin translation between OpenAI requests and the Engine.

``create_app(engine, config)`` returns a FastAPI app over an Engine in this process, or over any
``Backend`` (replicas.py serves through Ray replicas); ``serve(...)`` in run.py runs it under
uvicorn. Every route needs an API key except ``config.public_paths``; errors of every kind come back
in the OpenAI error shape with a 4xx status, never a traceback. The pieces live beside this module:
state.py (what every part shares), errors.py, middleware.py, admission.py, streaming.py and routes/.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..heads import SequenceClassifier, TokenClassifier
from ..inference.engine import Engine
from .backend import Backend, LocalBackend
from .errors import install_error_handlers
from .middleware import install_middleware
from .openapi import install_openapi
from .routes import add_routes
from .state import ServeConfig, ServerState

__all__ = ["ServeConfig", "create_app"]


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServerState = app.state.server
    state.backend.start()
    state.ready = True
    yield
    state.ready = False
    state.backend.shutdown()


def create_app(engine: Engine | Backend, config: ServeConfig, start_engine: bool = True,
               classifier: SequenceClassifier | TokenClassifier | None = None) -> FastAPI:
    """The app over ``engine``; with a ``classifier`` (sharing the engine's model) /v1/classify
    answers too, or /v1/ner with a token classifier. ``start_engine`` false: the caller runs the engine's loop (see LocalBackend)."""
    backend = LocalBackend(engine, classifier, start_engine) if isinstance(engine, Engine) else engine
    state = ServerState(backend, config)
    app = FastAPI(title="gptstack", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    install_middleware(app, state)
    add_routes(app)
    install_openapi(app, state)
    return app
