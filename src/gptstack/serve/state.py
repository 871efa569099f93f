"""The server's configuration and the state built from it, shared by every route, middleware and
error handler through ``app.state.server`` instead of closures over ``create_app``'s locals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..chat import DEFAULT_CHAT_STOPS, DEFAULT_CHAT_TEMPLATE
from ..heads import SequenceClassifier
from ..inference.engine import Engine
from ..tokenizer import Tokenizer
from .metrics import ServerMetrics
from .security import KeyStore, RateLimiter


@dataclass
class ServeConfig:
    model_name: str = "gptstack"
    keys: KeyStore = field(default_factory=lambda: KeyStore([]))
    auth: bool = True
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    metrics_public: bool = False
    log_prompts: bool = False
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    chat_stops: list[str] = field(default_factory=lambda: list(DEFAULT_CHAT_STOPS))

    @property
    def public_paths(self) -> set[str]:
        paths = {"/health", "/ready", "/", "/playground"}
        return paths | {"/metrics"} if self.metrics_public else paths


@dataclass
class ServerState:
    """One app's engine and config, and what it builds from them once: metrics, the per-key rate
    limiter and the compiled chat template. ``start_engine`` false means the caller runs the engine
    loop itself (`gptstack serve` keeps it on the main thread); ``ready`` is true while the app's
    lifespan is up."""
    engine: Engine
    config: ServeConfig
    classifier: SequenceClassifier | None = None
    start_engine: bool = True
    ready: bool = False
    metrics: ServerMetrics = field(init=False)
    limiter: RateLimiter = field(init=False)
    chat_template: Template = field(init=False)

    def __post_init__(self):
        self.metrics = ServerMetrics(self.engine)
        self.limiter = RateLimiter(self.config.requests_per_minute, self.config.tokens_per_minute)
        self.chat_template = ImmutableSandboxedEnvironment().from_string(self.config.chat_template)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def render_chat(self, messages) -> str:
        return self.chat_template.render(messages=[{"role": m.role, "content": m.text()} for m in messages])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def server_state(request: Request) -> ServerState:
    return request.app.state.server


# a route parameter annotated with this receives the app's ServerState
StateDep = Annotated[ServerState, Depends(server_state)]
