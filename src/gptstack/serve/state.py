"""The server's configuration and the state built from it, shared by every route, middleware and
error handler through ``app.state.server`` instead of closures over ``create_app``'s locals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..data.pii import Scrubber, StreamRedactor
from ..chat import DEFAULT_CHAT_STOPS, DEFAULT_CHAT_TEMPLATE, template_messages, tools_text
from ..tokenizer import Tokenizer
from .backend import Backend
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
    log_prompts: bool = False            # prompts are logged scrubbed of personal and secret data
    redact_output: bool = False          # completions scrubbed of them before they are sent
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    chat_stops: list[str] = field(default_factory=lambda: list(DEFAULT_CHAT_STOPS))
    limiter: RateLimiter | None = None   # shared by several apps (Ray replicas); None: the app's own

    @property
    def public_paths(self) -> set[str]:
        paths = {"/health", "/ready", "/", "/playground"}
        return paths | {"/metrics"} if self.metrics_public else paths


@dataclass
class ServerState:
    """One app's backend (what runs the model) and config, and what it builds from them once:
    metrics, the per-key rate limiter and the compiled chat template. ``ready`` is true while the
    app's lifespan is up."""
    backend: Backend
    config: ServeConfig
    ready: bool = False
    metrics: ServerMetrics = field(init=False)
    limiter: RateLimiter = field(init=False)
    chat_template: Template = field(init=False)
    scrubber: Scrubber = field(init=False)

    def __post_init__(self):
        self.scrubber = Scrubber()
        self.metrics = ServerMetrics(self.backend)
        self.limiter = self.config.limiter or RateLimiter(self.config.requests_per_minute, self.config.tokens_per_minute)
        self.chat_template = ImmutableSandboxedEnvironment().from_string(self.config.chat_template)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.backend.tokenizer

    def render_chat(self, messages, tools: list[dict] | None = None) -> str:
        """The prompt for ``messages`` (ChatMessage) with ``tools`` (OpenAI's shape) offered: the
        template gets OpenAI's fields, as Hugging Face templates expect, and chat.py's tool texts."""
        dicts = [m.as_dict() for m in messages]
        return self.chat_template.render(messages=template_messages(dicts), tools=tools or None,
                                         tools_text=tools_text(tools))

    def redacted(self, text: str) -> str:
        """``text`` as the client may see it: scrubbed when the server redacts its output."""
        return self.scrubber.scrub(text)[0] if self.config.redact_output else text

    def stream_redactors(self, n: int) -> list[StreamRedactor] | None:
        """One redactor per streamed choice when the server redacts its output, else None."""
        return [StreamRedactor(self.scrubber) for _ in range(n)] if self.config.redact_output else None

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def server_state(request: Request) -> ServerState:
    return request.app.state.server


# a route parameter annotated with this receives the app's ServerState
StateDep = Annotated[ServerState, Depends(server_state)]
