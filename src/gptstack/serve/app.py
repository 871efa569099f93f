"""The OpenAI-compatible HTTP server: a thin translation between OpenAI requests and the Engine.

``create_app(engine, config)`` returns a FastAPI app; ``serve(...)`` runs it under uvicorn. Every
route needs an API key except ``config.public_paths``; errors of every kind come back in the OpenAI
error shape with a 4xx status, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from jinja2.sandbox import ImmutableSandboxedEnvironment
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import DEFAULT_CHAT_STOPS, DEFAULT_CHAT_TEMPLATE
from ..heads import SequenceClassifier, classification_ids
from ..inference.engine import Engine, EngineStopped, QueueFull, RequestHandle, TokenEvent
from ..inference.sampling import SamplingParams
from .metrics import ServerMetrics
from .schemas import (ChatCompletionRequest, ClassifyRequest, CompletionRequest, DetokenizeRequest,
                      TokenizeRequest, error_body)
from .security import BodyLimitMiddleware, KeyStore, RateLimiter

log = logging.getLogger("gptstack.serve")

PLAYGROUND = Path(__file__).with_name("playground.html")


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


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def create_app(engine: Engine, config: ServeConfig, start_engine: bool = True,
               classifier: SequenceClassifier | None = None) -> FastAPI:
    """The app over ``engine``; with a ``classifier`` (sharing the engine's model) /v1/classify
    answers too."""
    tokenizer = engine.tokenizer
    metrics = ServerMetrics(engine)
    limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
    chat_template = ImmutableSandboxedEnvironment().from_string(config.chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:   # `gptstack serve` runs the engine on its main thread instead
            engine.start()
        app.state.ready = True
        yield
        app.state.ready = False
        engine.shutdown()

    app = FastAPI(title="gptstack", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ready = False

    # --- errors: always the OpenAI shape ----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.errors.labels(code=str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.errors.labels(code="400").inc()
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON (or not UTF-8): "
                                  f"{first.get('ctx', {}).get('error', first.get('msg'))}", code="invalid_json")
        location = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{location}: {first.get('msg')}"
        if first.get("type") == "extra_forbidden":
            message = f"unknown parameter {location!r}"
        return error_response(400, message, param=location)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        metrics.errors.labels(code=str(exc.status_code)).inc()
        if exc.status_code == 400:   # FastAPI could not read the body at all (e.g. not UTF-8)
            return error_response(400, f"the request body could not be parsed ({exc.detail}); send UTF-8 JSON",
                                  code="invalid_json")
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        metrics.errors.labels(code="500").inc()
        return error_response(500, "internal error; the server log has the details", "server_error")

    # --- middleware (pure ASGI, so that request.is_disconnected() still sees the client) ---------------
    async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": data})

    def auth_and_log(inner):
        async def middleware(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            started, path, status = time.perf_counter(), scope["path"], [0]
            key_id = "anonymous"
            if config.auth and path not in config.public_paths:
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                presented = auth[7:].strip() if auth.lower().startswith("bearer ") else \
                    headers.get(b"x-api-key", b"").decode("latin-1")
                key_id = config.keys.match(presented)
            scope.setdefault("state", {})["key_id"] = key_id

            async def tracked_send(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            if key_id is None:
                metrics.errors.labels(code="401").inc()
                await send_json(tracked_send, 401, error_body("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                                              "authentication_error", code="invalid_api_key"))
            else:
                await inner(scope, receive, tracked_send)
            metrics.requests.labels(route=path, status=str(status[0])).inc()
            log.info("%s %s -> %d in %.3fs key=%s", scope["method"], path, status[0], time.perf_counter() - started,
                     key_id or "invalid")
        return middleware

    async def reject_large(scope, send):
        metrics.errors.labels(code="413").inc()
        await send_json(send, 413, error_body(f"request body over {config.max_body_bytes} bytes", code="body_too_large"))

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, reject=reject_large)
    app.add_middleware(lambda inner: auth_and_log(inner))

    # --- helpers ------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(body, max_tokens: int, stops: list[str], logprobs: int | None, seed_offset: int) -> SamplingParams:
        if body.n > config.max_n:
            raise APIError(400, f"n must be at most {config.max_n}, got {body.n}", param="n")
        if getattr(body, "logit_bias", None):
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        bad_ids = [t for t in body.stop_token_ids if not 0 <= t < tokenizer.vocab_size]
        if bad_ids:
            raise APIError(400, f"stop_token_ids {bad_ids[:5]} are outside the vocabulary", param="stop_token_ids")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, min_p=body.min_p, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                              seed=None if body.seed is None else body.seed + seed_offset, stop=stops,
                              stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs)

    def charge(request: Request, tokens: int, remedy: str, param: str) -> None:
        """Count ``tokens`` against the key's rate limits, or refuse (400 if they can never fit, else 429)."""
        if limiter.exceeds_capacity(tokens):
            raise APIError(400, f"this request needs {tokens} tokens, more than the per-minute limit of "
                           f"{config.tokens_per_minute}; {remedy}", param=param)
        wait = limiter.acquire(request.state.key_id, tokens)
        if wait:
            raise APIError(429, f"rate limit reached for this API key; retry in {wait:.0f}s", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(int(wait))})

    def admit(request: Request, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestHandle]:
        """Validate against the context, charge the rate limits, and submit everything or nothing."""
        for ids, p in zip(prompts, params):
            try:
                engine.check(ids, p)
            except ValueError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        charge(request, sum(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)),
               "lower max_tokens or n", "max_tokens")
        handles = []
        try:
            for ids, p in zip(prompts, params):
                handles.append(engine.submit(ids, p))
        except (QueueFull, EngineStopped) as exc:
            for h in handles:
                h.cancel()
            raise APIError(503, f"the server is at capacity ({exc}); retry shortly", "server_overloaded",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        if config.log_prompts:
            log.info("prompts key=%s: %s", request.state.key_id, [tokenizer.decode(ids) for ids in prompts])
        return handles

    async def timed_events(handle: RequestHandle) -> AsyncIterator[TokenEvent]:
        """The handle's events, recording time to first token and inter-token latency."""
        last = None
        async for event in handle:
            now = time.perf_counter()
            if event.token_id is not None or event.text:
                if last is None:
                    metrics.ttft.observe(now - handle.submitted_at)
                else:
                    metrics.itl.observe(now - last)
                last = now
            yield event

    async def collect(request: Request, handles: list[RequestHandle]) -> list[list[TokenEvent]]:
        """All events of all handles; cancels them if the client goes away first."""
        async def gather(h):
            return [e async for e in timed_events(h)]

        tasks = [asyncio.ensure_future(gather(h)) for h in handles]
        done = asyncio.ensure_future(asyncio.gather(*tasks))
        try:
            while not done.done():
                if await request.is_disconnected():   # nobody to answer: free the engine's slots
                    raise APIError(499, "client closed the request", code="client_closed_request")
                await asyncio.wait([done], timeout=0.25)
            return done.result()
        finally:
            for h in handles:
                if not h.finished:
                    h.cancel()
            if not done.done():
                done.cancel()

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def head(prefix: str, obj: str) -> dict:
        return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": obj, "created": int(time.time()),
                "model": config.model_name}

    def streaming_response(handles: list[RequestHandle], head: dict, choice) -> StreamingResponse:
        """SSE: one chunk per event (``choice(index, event)`` builds its choice), then a usage chunk
        and ``data: [DONE]``. Every engine request is cancelled if the client leaves first."""
        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue = asyncio.Queue()
            prompt_tokens = completion_tokens = 0

            async def pump(index, handle):
                async for event in timed_events(handle):
                    await queue.put((index, event))
                await queue.put((index, None))

            tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
            try:
                remaining = len(handles)
                while remaining:
                    index, event = await queue.get()
                    if event is None:
                        remaining -= 1
                        continue
                    if event.finish_reason is not None:
                        prompt_tokens += event.prompt_tokens
                        completion_tokens += event.completion_tokens
                    yield sse({**head, "choices": [choice(index, event)]})
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
                yield sse("[DONE]")
            finally:
                for h in handles:
                    if not h.finished:
                        h.cancel()
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    def non_streaming_usage(results: list[list[TokenEvent]]) -> dict:
        return usage(sum(events[-1].prompt_tokens for events in results),
                     sum(events[-1].completion_tokens for events in results))

    # --- routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not app.state.ready:
            return error_response(503, "the model is still loading", "server_error", code="not_ready")
        return {"status": "ready", "model": config.model_name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    @app.get("/playground", response_class=HTMLResponse)
    async def playground():
        page = PLAYGROUND.read_text().replace("{{MODEL}}", config.model_name)
        return HTMLResponse(page.replace("{{CLASSIFIER}}", "true" if classifier is not None else "false"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "gptstack", "max_model_len": engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(body.messages)
        ids = tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary of {tokenizer.vocab_size}",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        check_model(body.model)
        if classifier is None:
            raise APIError(404, f"model {config.model_name!r} has no classification head; serve a checkpoint made by "
                           "`gptstack finetune --task classification`", code="no_classifier")
        ids = [classification_ids(tokenizer, text, engine.model.config.block_size) for text in body.input]
        tokens = sum(len(i) for i in ids)
        charge(request, tokens, "send fewer or shorter texts", "input")
        try:
            probs = await asyncio.wrap_future(engine.call(lambda: classifier.predict(ids)))
        except (QueueFull, EngineStopped) as exc:
            raise APIError(503, f"the server is at capacity ({exc}); retry shortly", "server_overloaded",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        labels = classifier.labels
        data = [{"index": i, "label": labels[int(row.argmax())], "score": float(row.max()),
                 "scores": {label: float(p) for label, p in zip(labels, row)}} for i, row in enumerate(probs)]
        return {**head("clf", "list"), "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def render_chat(messages) -> str:
        return chat_template.render(messages=[{"role": m.role, "content": m.text()} for m in messages])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (it must be unset or equal n)", param="best_of")
        prompts = prompt_ids(body.prompt)
        max_tokens = body.max_tokens or 16
        pairs = [(ids, sampling(body, max_tokens, body.stop, body.logprobs, i))
                 for ids in prompts for i in range(body.n)]
        handles = admit(request, [p for p, _ in pairs], [s for _, s in pairs])
        echo = [tokenizer.decode(ids) if body.echo else "" for ids, _ in pairs]

        def completion_logprobs(events: list[TokenEvent]):
            if body.logprobs is None:
                return None
            events = [e for e in events if e.token_id is not None and e.logprob is not None]
            offsets, offset = [], 0
            for e in events:
                offsets.append(offset)
                offset += len(token_text(e.token_id))
            return {"tokens": [token_text(e.token_id) for e in events],
                    "token_logprobs": [e.logprob for e in events],
                    "top_logprobs": [{token_text(t): lp for t, lp in (e.top_logprobs or [])} for e in events],
                    "text_offset": offsets}

        response_head = head("cmpl", "text_completion")
        if body.stream:
            first = [True] * len(handles)

            def choice(index: int, event: TokenEvent) -> dict:
                text = (echo[index] if first[index] else "") + event.text
                first[index] = False
                return {"index": index, "text": text, "finish_reason": event.finish_reason,
                        "logprobs": completion_logprobs([event])}

            return streaming_response(handles, response_head, choice)

        results = await collect(request, handles)
        choices = [{"index": i, "text": echo[i] + "".join(e.text for e in events), "finish_reason": events[-1].finish_reason,
                    "logprobs": completion_logprobs(events)} for i, events in enumerate(results)]
        return {**response_head, "choices": choices, "usage": non_streaming_usage(results)}

    def prompt_ids(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [tokenizer.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], str):
            return [tokenizer.encode(p) for p in prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [list(p) for p in prompt]

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        ids = tokenizer.encode(render_chat(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_seq_len - len(ids))
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (top or 0) if body.logprobs else None
        params = [sampling(body, max_tokens, body.stop + config.chat_stops, logprobs, i) for i in range(body.n)]
        handles = admit(request, [ids] * body.n, params)

        def chat_logprobs(events: list[TokenEvent]):
            if not body.logprobs:
                return None

            def entry(token_id, logprob):
                text = token_text(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**entry(e.token_id, e.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                                for e in events if e.token_id is not None and e.logprob is not None]}

        response_head = head("chatcmpl", "chat.completion")
        if body.stream:
            first = [True] * len(handles)

            def choice(index: int, event: TokenEvent) -> dict:
                delta = {"role": "assistant", "content": event.text} if first[index] else {"content": event.text}
                first[index] = False
                return {"index": index, "delta": delta, "finish_reason": event.finish_reason,
                        "logprobs": chat_logprobs([event])}

            return streaming_response(handles, {**response_head, "object": "chat.completion.chunk"}, choice)

        results = await collect(request, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in events)},
                    "finish_reason": events[-1].finish_reason, "logprobs": chat_logprobs(events)}
                   for i, events in enumerate(results)]
        return {**response_head, "choices": choices, "usage": non_streaming_usage(results)}

    return app
