"""How a conversation becomes text: the one chat format that fine-tuning writes and serving reads.

The default format is plain ``Role: content`` lines, system text first, and an ``Assistant:`` cue
for the model to answer (a GPT-2-style model has no special chat tokens). ``chat_segments`` spells
out the same format piece by piece, marking which pieces the model should learn to produce, so a
model fine-tuned on conversations sees exactly what the server will send it.
"""

from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}"
    "{% endfor %}Assistant:"
)
DEFAULT_CHAT_STOPS = ["\nUser:", "\nSystem:"]
ROLES = ("system", "developer", "user", "assistant")


def chat_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of a conversation in the default format; the assistant's words
    are the response pieces. Joined, the pieces before an assistant turn are what the default
    template renders as the prompt for that turn."""
    segments: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {i} must have a role in {ROLES} and a string content, got {message!r}")
        if role in ("system", "developer"):
            segments.append((f"{content}\n\n", False))
        elif role == "user":
            segments.append((f"User: {content}\n", False))
        else:
            segments += [("Assistant:", False), (f" {content}\n", True)]
    if not any(is_response for _, is_response in segments):
        raise ValueError("a conversation needs at least one assistant message to learn from")
    return segments
