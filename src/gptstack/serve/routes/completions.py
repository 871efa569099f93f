"""POST /v1/completions: one or more prompts (text or token ids), n samples of each."""

from __future__ import annotations

import dataclasses
from itertools import accumulate

from fastapi import Request

from ...heads import ScoredToken
from ...inference.engine import TokenEvent
from ..admission import admit, charge, check_model, check_redaction, check_request, check_sampling
from ..errors import APIError
from ..schemas import CompletionRequest, response_head, usage
from ..state import ServerState, StateDep
from ..streaming import collect, collected_usage, event_stream


async def completions(body: CompletionRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported: this model only continues text", param="suffix")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise APIError(400, f"best_of ({best_of}) must be at least n ({body.n})", param="best_of")
    if body.best_of is not None and best_of > state.config.max_n:    # (n itself is checked with the rest)
        raise APIError(400, f"best_of must be at most {state.config.max_n}, got {best_of}", param="best_of")
    if best_of > body.n and body.stream:
        raise APIError(400, "best_of cannot be used with stream: the best are known only at the end", param="best_of")
    prompts = prompt_ids(state, body.prompt)
    check_sampling(state, body)
    check_redaction(state, body.logprobs is not None)
    if body.max_tokens == 0:
        return await scored_prompts(body, request, state, prompts)
    # with best_of, every candidate reports its tokens' logprobs, by which the best are chosen
    pairs = [(ids, body.sampling_params(sample, best_of > body.n)) for ids in prompts for sample in range(best_of)]
    # echo with logprobs: the prompt's own tokens scored too, as OpenAI's (the first has none)
    scores = await prompt_scores(body, state, prompts)
    handles = await admit(state, request, [ids for ids, _ in pairs], [params for _, params in pairs])
    echo = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]
    echoed = [scores[p] if scores else [] for p in range(len(prompts)) for _ in range(body.n)]
    redactors = state.stream_redactors(len(echo)) if body.stream else None

    def choice(index: int, events: list[TokenEvent], first: bool) -> dict:
        """A whole choice, or the part of one that a stream chunk carries; the echo goes first."""
        entries = (echoed[index] if first else []) + [(e.token_id, e.logprob, e.top_logprobs or []) for e in events
                                                      if e.token_id is not None and e.logprob is not None]
        text = (echo[index] if first else "") + "".join(e.text for e in events)
        if redactors:      # a streamed piece: what is safe to send yet
            text = redactors[index].push(text, last=events[-1].finish_reason is not None)
        return {"index": index, "text": text if redactors else state.redacted(text),
                "finish_reason": events[-1].finish_reason,
                "logprobs": None if body.logprobs is None else completion_logprobs(state, entries)}

    head = response_head("cmpl", "text_completion", state.config.model_name)
    if body.stream:
        return event_stream(handles, head, lambda index, event, first: choice(index, [event], first), state.metrics,
                            body.include_usage)
    results = await collect(request, handles, state.metrics)
    kept = [events for p in range(len(prompts)) for events in best(results[p * best_of:(p + 1) * best_of], body.n)]
    return {**head, "choices": [choice(i, events, True) for i, events in enumerate(kept)],
            "usage": collected_usage(results)}      # every candidate's tokens were generated


async def prompt_scores(body: CompletionRequest, state: ServerState, prompts: list[list[int]]) -> list | None:
    """Each prompt's tokens with their logprobs when echo and logprobs ask for them, else None."""
    if not (body.echo and body.logprobs is not None):
        return None
    for ids in prompts:   # checked as a request for one token would be, less that token
        check_request(state, ids[:-1] or ids, dataclasses.replace(body.sampling_params(0), max_new_tokens=1))
    return await state.backend.score(prompts, body.logprobs)


async def scored_prompts(body: CompletionRequest, request: Request, state: ServerState, prompts: list[list[int]]) -> dict:
    """``max_tokens: 0``: nothing generated, each prompt echoed (with its tokens' logprobs when
    asked): how evaluation harnesses score a text through a completions API."""
    if not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is only allowed with echo (to score the prompt)",
                       param="max_tokens")
    if body.stream:
        raise APIError(400, "max_tokens 0 cannot be streamed: there is nothing to stream", param="stream")
    tokens = sum(map(len, prompts))
    await charge(state, request, tokens * body.n, "send fewer or shorter prompts", "prompt")
    scores = await prompt_scores(body, state, prompts)
    choices = [{"index": p * body.n + i, "text": state.redacted(state.tokenizer.decode(ids)), "finish_reason": "length",
                "logprobs": None if scores is None else completion_logprobs(state, scores[p])}
               for p, ids in enumerate(prompts) for i in range(body.n)]
    return {**response_head("cmpl", "text_completion", state.config.model_name), "choices": choices,
            "usage": usage(tokens * body.n, 0)}


def best(candidates: list[list[TokenEvent]], n: int) -> list[list[TokenEvent]]:
    """The n candidates of highest log probability per token (OpenAI's best_of), best first."""
    def mean_logprob(events: list[TokenEvent]) -> float:
        logprobs = [e.logprob for e in events if e.token_id is not None and e.logprob is not None]
        return sum(logprobs) / len(logprobs) if logprobs else float("-inf")
    return sorted(candidates, key=mean_logprob, reverse=True)[:n] if len(candidates) > n else candidates


def prompt_ids(state: ServerState, prompt) -> list[list[int]]:
    """The token ids of each prompt, whichever of the four OpenAI prompt forms was sent."""
    if isinstance(prompt, str):
        return [state.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        return [state.tokenizer.encode(p) for p in prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


def completion_logprobs(state: ServerState, entries: list[ScoredToken]) -> dict:
    """The legacy completions logprobs shape: parallel lists, with each token's offset in the text
    (None where a token has no logprob: an echoed prompt's first)."""
    texts = [state.token_text(token) for token, _, _ in entries]
    return {"tokens": texts, "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [None if top is None else {state.token_text(t): lp for t, lp in top} for _, _, top in entries],
            "text_offset": list(accumulate(map(len, texts), initial=0))[:-1]}
