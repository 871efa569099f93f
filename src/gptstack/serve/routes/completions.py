"""POST /v1/completions: one or more prompts (text or token ids), n samples of each."""

from __future__ import annotations

from itertools import accumulate

from fastapi import Request

from ...inference.engine import TokenEvent
from ..admission import admit, check_model, check_sampling
from ..errors import APIError
from ..schemas import CompletionRequest, response_head
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
    # with best_of, every candidate reports its tokens' logprobs, by which the best are chosen
    pairs = [(ids, body.sampling_params(sample, best_of > body.n)) for ids in prompts for sample in range(best_of)]
    handles = await admit(state, request, [ids for ids, _ in pairs], [params for _, params in pairs])
    echo = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]

    def choice(index: int, events: list[TokenEvent], first: bool) -> dict:
        """A whole choice, or the part of one that a stream chunk carries; the echo goes first."""
        return {"index": index, "text": (echo[index] if first else "") + "".join(e.text for e in events),
                "finish_reason": events[-1].finish_reason,
                "logprobs": None if body.logprobs is None else completion_logprobs(state, events)}

    head = response_head("cmpl", "text_completion", state.config.model_name)
    if body.stream:
        return event_stream(handles, head, lambda index, event, first: choice(index, [event], first), state.metrics,
                            body.include_usage)
    results = await collect(request, handles, state.metrics)
    kept = [events for p in range(len(prompts)) for events in best(results[p * best_of:(p + 1) * best_of], body.n)]
    return {**head, "choices": [choice(i, events, True) for i, events in enumerate(kept)],
            "usage": collected_usage(results)}      # every candidate's tokens were generated


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


def completion_logprobs(state: ServerState, events: list[TokenEvent]) -> dict:
    """The legacy completions logprobs shape: parallel lists, with each token's offset in the text."""
    events = [e for e in events if e.token_id is not None and e.logprob is not None]
    texts = [state.token_text(e.token_id) for e in events]
    return {"tokens": texts, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{state.token_text(t): lp for t, lp in (e.top_logprobs or [])} for e in events],
            "text_offset": list(accumulate(map(len, texts), initial=0))[:-1]}
