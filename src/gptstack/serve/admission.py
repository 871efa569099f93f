"""What a request must pass before the engine sees it: the model name, the server's sampling
limits, the context length and the key's rate limits. Admission is all or nothing, so a request
for n samples never leaves some of them running after a refusal."""

from __future__ import annotations

import logging

from fastapi import Request

from ..inference.engine import EngineStopped, QueueFull
from ..inference.sampling import SamplingParams
from .backend import Handle
from .errors import APIError, overloaded
from .schemas import SamplingFields
from .state import ServerState

log = logging.getLogger("gptstack.serve")


def check_model(state: ServerState, name: str | None) -> None:
    served = state.config.model_name
    if name is not None and name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def check_sampling(state: ServerState, body: SamplingFields) -> None:
    """The limits of this server that the request schema cannot know: n, the vocabulary."""
    max_n = state.config.max_n
    if body.n > max_n:
        raise APIError(400, f"n must be at most {max_n}, got {body.n}", param="n")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    vocab_size = state.tokenizer.vocab_size
    for param, ids in (("stop_token_ids", body.stop_token_ids), ("logit_bias", body.logit_bias or {})):
        bad_ids = [t for t in ids if not 0 <= t < vocab_size]
        if bad_ids:
            raise APIError(400, f"{param} token ids {bad_ids[:5]} are outside the vocabulary of {vocab_size}",
                           param=param)


async def charge(state: ServerState, request: Request, tokens: int, remedy: str, param: str) -> None:
    """Count ``tokens`` against the key's rate limits, or refuse (400 if they can never fit, else 429)."""
    if state.limiter.exceeds_capacity(tokens):
        raise APIError(400, f"this request needs {tokens} tokens, more than the per-minute limit of "
                       f"{state.config.tokens_per_minute}; {remedy}", param=param)
    wait = await state.limiter.take(request.state.key_id, tokens)
    if wait:
        raise APIError(429, f"rate limit reached for this API key; retry in {wait:.0f}s", "rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(int(wait))})


def check_redaction(state: ServerState, logprobs: bool) -> None:
    """Logprobs name the tokens themselves, which redaction cannot reach: refused with it."""
    if state.config.redact_output and logprobs:
        raise APIError(400, "this server redacts personal data in its output (--redact-output), which logprobs "
                       "would show token by token; ask without logprobs", param="logprobs")


def check_request(state: ServerState, prompt_ids: list[int], params: SamplingParams) -> None:
    """The backend's checks (empty, too long, ids outside the vocabulary ...) as a 400."""
    try:
        state.backend.check(prompt_ids, params)
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from None


async def admit(state: ServerState, request: Request, prompts: list[list[int]],
                params: list[SamplingParams]) -> list[Handle]:
    """Validate against the context, charge the rate limits, and submit everything or nothing."""
    for ids, p in zip(prompts, params):
        check_request(state, ids, p)
    await charge(state, request, sum(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)),
           "lower max_tokens or n", "max_tokens")
    handles = []
    try:
        for ids, p in zip(prompts, params):
            handles.append(await state.backend.submit(ids, p))
    except BaseException as exc:    # refused, or the client left mid-way: nothing stays running
        for h in handles:
            h.cancel()
        if isinstance(exc, (QueueFull, EngineStopped)):
            raise overloaded(exc) from None
        raise
    if state.config.log_prompts:      # scrubbed: a log is kept longer and read by more people than a reply
        log.info("prompts key=%s: %s", request.state.key_id,
                 [state.scrubber.scrub(state.tokenizer.decode(ids))[0] for ids in prompts])
    return handles
