"""From engine handles to an HTTP answer: all events at once (``collect``) or as server-sent events
(``event_stream``). Either way the engine's requests are cancelled when the client leaves first,
and the latency metrics see every token."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..inference.engine import EngineStopped, RequestFailed, TokenEvent
from .backend import Handle
from .errors import APIError, engine_error
from .metrics import ServerMetrics
from .schemas import error_body, usage

log = logging.getLogger("gptstack.serve")

# builds a stream chunk's choice from (choice index, event, whether it is that choice's first chunk)
ChunkChoice = Callable[[int, TokenEvent, bool], "dict | None"]   # None: nothing to send for this event yet


async def timed_events(handle: Handle, metrics: ServerMetrics) -> AsyncIterator[TokenEvent]:
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


def cancel_unfinished(handles: list[Handle]) -> None:
    for h in handles:
        if not h.finished:
            h.cancel()


async def collect(request: Request, handles: list[Handle], metrics: ServerMetrics) -> list[list[TokenEvent]]:
    """All events of all handles; cancels them if the client goes away first."""
    async def gather(handle):
        return [e async for e in timed_events(handle, metrics)]

    done = asyncio.ensure_future(asyncio.gather(*[gather(h) for h in handles]))
    try:
        while not done.done():
            if await request.is_disconnected():   # nobody to answer: free the engine's slots
                raise APIError(499, "client closed the request", code="client_closed_request")
            await asyncio.wait([done], timeout=0.05)   # decoding is fast: notice a departure soon
        return done.result()
    finally:
        cancel_unfinished(handles)
        if not done.done():
            done.cancel()


def collected_usage(results: list[list[TokenEvent]]) -> dict:
    return usage(sum(events[-1].prompt_tokens for events in results),
                 sum(events[-1].completion_tokens for events in results))


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def merged_events(handles: list[Handle], metrics: ServerMetrics) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(handle index, event) from all handles in the order the events come; cancels the unfinished
    handles when the consumer stops early (the client left)."""
    if len(handles) == 1:     # the common case: its events as they come, no queue and task per token between
        try:
            async with aclosing(timed_events(handles[0], metrics)) as events:
                async for event in events:
                    yield 0, event
        finally:
            cancel_unfinished(handles)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, handle):
        try:
            async for event in timed_events(handle, metrics):
                await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:    # e.g. the replica decoding it died: the consumer raises it
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if event is None:
                remaining -= 1
            else:
                yield index, event
    finally:
        cancel_unfinished(handles)
        for t in tasks:
            t.cancel()


async def sse_chunks(handles: list[Handle], head: dict, choice: ChunkChoice,
                     metrics: ServerMetrics, include_usage: bool) -> AsyncIterator[str]:
    """One chunk per event (unless ``choice`` holds it back), then a usage chunk if asked for
    (``stream_options.include_usage``) and ``data: [DONE]``. If the engine stops mid-stream (a
    replica died), an error event ends the stream instead, which the openai client raises as an
    APIError."""
    prompt_tokens = completion_tokens = 0
    started: set[int] = set()
    try:
        async with aclosing(merged_events(handles, metrics)) as events:   # closed at once when the client leaves
            async for index, event in events:
                if event.finish_reason is not None:
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
                chunk = choice(index, event, index not in started)
                if chunk is not None:
                    yield sse({**head, "choices": [chunk]})
                    started.add(index)
    except (EngineStopped, RequestFailed) as exc:     # the same words as a request not yet streaming gets
        refusal = engine_error(exc)
        metrics.count_error(refusal.status)
        yield sse(error_body(refusal.message, refusal.type, None, refusal.code))
        return
    except Exception:    # headers are sent: the client hears of it as an error event, not a cut stream
        log.exception("a stream failed")
        metrics.count_error(500)
        yield sse(error_body("internal error; the server log has the details", "server_error", None, None))
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield sse("[DONE]")


def event_stream(handles: list[Handle], head: dict, choice: ChunkChoice,
                 metrics: ServerMetrics, include_usage: bool) -> StreamingResponse:
    return StreamingResponse(sse_chunks(handles, head, choice, metrics, include_usage), media_type="text/event-stream")
