"""How a conversation becomes text: the one chat format that fine-tuning writes and serving reads.

The default format is plain ``Role: content`` lines, system text first, and an ``Assistant:`` cue
for the model to answer (a GPT-2-style model has no special chat tokens). ``chat_segments`` spells
out the same format piece by piece, marking which pieces the model should learn to produce, so a
model fine-tuned on conversations sees exactly what the server will send it.

Tools (OpenAI's function calling) in the same plain text:

    Tools: [{"name": "get_weather", "description": "...", "parameters": {...}}]   (first, if any)
    Assistant: <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]
    Tool: {"temperature": 21}

An assistant turn that calls tools is ``<tool_call>`` and a JSON list of calls; a tool's result is
a ``Tool:`` line. The server constrains a reply that must be a call to exactly that shape (see
inference/structured.py), and reads it back with ``parse_tool_calls``. The template gets the two
tool texts ready-made (``tools_text``, and ``tool_call_text`` on such assistant messages) so that it
needs no filters of ours: a Hugging Face template or llama.cpp reading the GGUF ignores them.
"""

from __future__ import annotations

import json

DEFAULT_CHAT_TEMPLATE = (
    "{{ tools_text }}"
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% elif m.role == 'tool' %}Tool: {{ m.content }}\n"
    "{% elif m.tool_call_text %}Assistant: {{ m.tool_call_text }}\n"
    "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}"
    "{% endfor %}Assistant:"
)
DEFAULT_CHAT_STOPS = ["\nUser:", "\nSystem:", "\nTool:"]
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CALL_TAG = "<tool_call>"


def as_json(value) -> str:
    """JSON as the model reads and writes it: ", " and ": " (as GPT-2's tokens like them), UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def tools_text(tools: list[dict] | None) -> str:
    """The tools' definitions (OpenAI's {"type": "function", "function": {...}}) as the prompt's first line."""
    if not tools:
        return ""
    return f"Tools: {as_json([tool['function'] for tool in tools])}\n\n"


def tool_calls_text(calls: list[dict]) -> str:
    """An assistant's tool calls (OpenAI's shape, arguments a JSON string) as the model writes them."""
    written = []
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:   # kept as the string it is (OpenAI does not refuse such a history either)
                pass
        written.append({"name": function["name"], "arguments": arguments})
    return TOOL_CALL_TAG + as_json(written)


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in a reply that is ``<tool_call>[...]`` (leading spaces aside), as [{"name",
    "arguments"}]; None when the reply is text or the list is incomplete (cut by max_tokens)."""
    text = text.lstrip()
    if not text.startswith(TOOL_CALL_TAG):
        return None
    try:
        calls = json.loads(text[len(TOOL_CALL_TAG):])
    except json.JSONDecodeError:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        return None
    return calls


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages for the template: as given, plus ``tool_call_text`` on those that call tools."""
    return [{**m, "tool_call_text": tool_calls_text(m["tool_calls"])} if m.get("tool_calls") else m for m in messages]


def chat_segments(messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of a conversation in the default format; the assistant's words
    and tool calls are the response pieces. Joined, the pieces before an assistant turn are what
    the default template renders as the prompt for that turn."""
    segments: list[tuple[str, bool]] = [(tools_text(tools), False)] if tools else []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if role not in ROLES or not (isinstance(content, str) or calls):
            raise ValueError(f"message {i} must have a role in {ROLES} and a string content "
                             f"(or, from the assistant, tool_calls), got {message!r}")
        if role in ("system", "developer"):
            segments.append((f"{content}\n\n", False))
        elif role == "user":
            segments.append((f"User: {content}\n", False))
        elif role == "tool":
            segments.append((f"Tool: {content}\n", False))
        else:
            segments += [("Assistant:", False), (f" {tool_calls_text(calls) if calls else content}\n", True)]
    if not any(is_response for _, is_response in segments):
        raise ValueError("a conversation needs at least one assistant message to learn from")
    return segments
