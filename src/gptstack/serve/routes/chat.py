"""POST /v1/chat/completions: the messages rendered through the chat template into one prompt,
n replies to it; with ``tools``, replies that may (or must) be tool calls.

A reply that must call a tool (``tool_choice`` "required" or a named function) is decoded under a
grammar of chat.py's call format whose arguments follow each function's parameter schema, so the
call parses and validates whatever the model's weights; with "auto" the grammar lets the model
choose between text and a call. The reply is read back into OpenAI's ``tool_calls``.
"""

from __future__ import annotations

import dataclasses
import secrets

from fastapi import Request

from ...chat import TOOL_CALL_TAG, as_json, parse_tool_calls
from ...inference.engine import TokenEvent
from ...inference.structured import GrammarError, check_grammar, response_format_grammar, tool_call_grammar
from ..admission import admit, check_model, check_redaction, check_sampling
from ..errors import APIError
from ..schemas import ChatCompletionRequest, response_head
from ..state import ServerState, StateDep
from ..streaming import collect, collected_usage, event_stream


async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    check_tools(body)
    ids = state.tokenizer.encode(state.render_chat(body.messages, body.tool_dicts))
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    check_sampling(state, body)
    check_redaction(state, body.logprobs)
    grammar = response_grammar(state, body)
    context_left = max(1, state.backend.max_seq_len - len(ids))
    params = [dataclasses.replace(body.sampling_params(sample, context_left, state.config.chat_stops), grammar=grammar)
              for sample in range(body.n)]
    handles = await admit(state, request, [ids] * body.n, params)

    def logprobs(events: list[TokenEvent]) -> dict | None:
        return chat_logprobs(state, events) if body.logprobs else None

    head = response_head("chatcmpl", "chat.completion", state.config.model_name)
    if body.stream:
        replies = [ReplyStream(body.tool_mode is not None) for _ in range(body.n)]
        redactors = state.stream_redactors(body.n)

        def chunk_choice(index: int, event: TokenEvent, first: bool) -> dict | None:
            """The first chunk of each choice names the role, as OpenAI's do."""
            delta, finish_reason = replies[index].delta(event)
            if delta is None:
                return None
            if redactors and delta.get("content") is not None:
                delta = {**delta, "content": redactors[index].push(delta["content"], last=finish_reason is not None)}
            return {"index": index, "delta": {"role": "assistant", **delta} if first else delta,
                    "finish_reason": finish_reason, "logprobs": logprobs([event])}
        return event_stream(handles, {**head, "object": "chat.completion.chunk"}, chunk_choice, state.metrics,
                            body.include_usage)
    results = await collect(request, handles, state.metrics)
    choices = []
    for i, events in enumerate(results):
        message, finish_reason = reply(state.redacted("".join(e.text for e in events)), events[-1].finish_reason,
                                       body.tool_mode is not None)
        choices.append({"index": i, "message": message, "finish_reason": finish_reason, "logprobs": logprobs(events)})
    return {**head, "choices": choices, "usage": collected_usage(results)}


def check_tools(body: ChatCompletionRequest) -> None:
    """What the schema alone cannot check: a tool_choice needs tools, and names one of them."""
    if body.tool_choice is not None and body.tool_choice != "none" and not body.tools:
        raise APIError(400, "tool_choice needs tools: give the functions the model may call", param="tool_choice")
    names = [tool.function.name for tool in body.tools or []]
    if len(set(names)) != len(names):
        raise APIError(400, f"tools must have distinct names, got {names}", param="tools")
    mode = body.tool_mode
    if mode and mode[0] == "function" and mode[1] not in names:
        raise APIError(400, f"tool_choice names {mode[1]!r}, which is not among the tools {names}", param="tool_choice")
    if mode and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "give either tools (with a tool_choice other than none) or a response_format, not both",
                       param="response_format")


def response_grammar(state: ServerState, body: ChatCompletionRequest) -> str | None:
    """The grammar a ``response_format`` or the tools ask for (None for free text), checked here: a
    schema the matcher cannot use is a 400 naming it, before anything is queued."""
    mode = body.tool_mode
    param = "tools" if mode else "response_format"
    try:
        if mode:
            grammar = tool_call_grammar([tool.function.model_dump(exclude_none=True) for tool in body.tools], *mode,
                                        parallel=body.parallel_tool_calls)
        elif body.response_format is not None:
            if body.response_format.type == "json_schema" and body.response_format.json_schema is None:
                raise APIError(400, "response_format json_schema needs a json_schema: {\"name\": ..., \"schema\": {...}}",
                               param=param)
            grammar = response_format_grammar(body.response_format.as_dict())
        else:
            return None
        if grammar is not None:
            check_grammar(state.tokenizer, grammar)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=param) from None
    return grammar


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    """chat.py's calls as OpenAI's ``tool_calls``: each with an id, its arguments a JSON string."""
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": call["name"], "arguments": as_json(call.get("arguments", {}))}} for call in calls]


def reply(text: str, finish_reason: str, tools_offered: bool) -> tuple[dict, str]:
    """The assistant message for a finished reply, and its finish_reason ("tool_calls" for calls)."""
    calls = parse_tool_calls(text) if tools_offered else None
    if calls is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": openai_tool_calls(calls)}, "tool_calls"


class ReplyStream:
    """One choice's deltas. Text streams as it comes; when tools are offered, a reply that begins
    like a call is held back until it ends, then sent as one ``tool_calls`` delta (which the openai
    client and LangChain assemble as they do OpenAI's)."""

    def __init__(self, tools_offered: bool):
        self.held = ""
        self.decided = not tools_offered     # known to be text (True), or still possibly a call

    def delta(self, event: TokenEvent) -> tuple[dict | None, str | None]:
        if self.decided:
            return {"content": event.text}, event.finish_reason
        self.held += event.text
        start = self.held.lstrip()
        if event.finish_reason is not None:
            message, finish_reason = reply(self.held, event.finish_reason, True)
            if message["content"] is None:
                return {"content": None, "tool_calls": [{"index": i, **call} for i, call in
                                                        enumerate(message["tool_calls"])]}, finish_reason
            return {"content": self.held}, finish_reason
        if start.startswith(TOOL_CALL_TAG) or TOOL_CALL_TAG.startswith(start):
            return None, None                    # a call, or maybe one: wait for more
        self.decided, text, self.held = True, self.held, ""
        return {"content": text}, None


def chat_logprobs(state: ServerState, events: list[TokenEvent]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                        for e in events if e.token_id is not None and e.logprob is not None]}
