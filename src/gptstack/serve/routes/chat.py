"""POST /v1/chat/completions: the messages rendered through the chat template into one prompt,
n replies to it."""

from __future__ import annotations

import dataclasses

from fastapi import Request

from ...inference.engine import TokenEvent
from ...inference.structured import GrammarError, check_grammar, response_format_grammar
from ..admission import admit, check_model, check_sampling
from ..errors import APIError
from ..schemas import ChatCompletionRequest, response_head
from ..state import ServerState, StateDep
from ..streaming import collect, collected_usage, event_stream


async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    ids = state.tokenizer.encode(state.render_chat(body.messages))
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    check_sampling(state, body)
    grammar = response_grammar(state, body)
    context_left = max(1, state.backend.max_seq_len - len(ids))
    params = [dataclasses.replace(body.sampling_params(sample, context_left, state.config.chat_stops), grammar=grammar)
              for sample in range(body.n)]
    handles = await admit(state, request, [ids] * body.n, params)

    def logprobs(events: list[TokenEvent]) -> dict | None:
        return chat_logprobs(state, events) if body.logprobs else None

    def chunk_choice(index: int, event: TokenEvent, first: bool) -> dict:
        """The first chunk of each choice names the role, as OpenAI's do."""
        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
        return {"index": index, "delta": delta, "finish_reason": event.finish_reason, "logprobs": logprobs([event])}

    head = response_head("chatcmpl", "chat.completion", state.config.model_name)
    if body.stream:
        return event_stream(handles, {**head, "object": "chat.completion.chunk"}, chunk_choice, state.metrics,
                            body.include_usage)
    results = await collect(request, handles, state.metrics)
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in events)},
                "finish_reason": events[-1].finish_reason, "logprobs": logprobs(events)}
               for i, events in enumerate(results)]
    return {**head, "choices": choices, "usage": collected_usage(results)}


def chat_logprobs(state: ServerState, events: list[TokenEvent]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                        for e in events if e.token_id is not None and e.logprob is not None]}


def response_grammar(state: ServerState, body: ChatCompletionRequest) -> str | None:
    """The grammar a ``response_format`` asks for (None for text), checked here: a schema the
    matcher cannot use is a 400 naming it, before anything is queued."""
    if body.response_format is None:
        return None
    if body.response_format.type == "json_schema" and body.response_format.json_schema is None:
        raise APIError(400, "response_format json_schema needs a json_schema: {\"name\": ..., \"schema\": {...}}",
                       param="response_format")
    try:
        grammar = response_format_grammar(body.response_format.as_dict())
        if grammar is not None:
            check_grammar(state.tokenizer, grammar)
    except GrammarError as exc:
        raise APIError(400, str(exc), param="response_format") from None
    return grammar
