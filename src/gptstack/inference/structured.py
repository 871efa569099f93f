"""Grammar-constrained decoding: output that must parse as JSON, or validate against a JSON schema.

Each constrained request holds a matcher over the tokenizer's vocabulary (llguidance, Microsoft's
Rust parser behind Guidance). Before a draw, the matcher writes the set of tokens that keep the
output inside the grammar into its row of a bitmask; every other token's logit becomes -inf, so even
a random-weight model produces JSON that parses and validates. After the draw the matcher consumes
the token; when the grammar is complete (only end-of-text is left) the request stops.

Why llguidance (measured here, docs/architecture.md): a schema compiles in under 1 ms (xgrammar and
outlines-core took ~300 ms for a schema with enums and bounds, which matters when every request may
bring its own), masks cost ~0.02 ms a row, it needs no torch or transformers, and it was the only
one of the three whose output always validated (xgrammar let control characters into bounded
strings; outlines-core ignores integer bounds).
"""

from __future__ import annotations

import copy
import functools
import json

import torch
import torch.nn.functional as F

from ..chat import TOOL_CALL_TAG
from ..tokenizer import Tokenizer

# ", " and ": " as OpenAI's models write them (and as GPT-2's tokens like ' "' want); no free
# whitespace, which a weak model would fill with newlines until max_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A response format or schema the matcher cannot compile; the message says what is wrong."""


def response_format_grammar(response_format: dict) -> str | None:
    """The grammar (llguidance's JSON form) for an OpenAI ``response_format``, or None for plain text.
    ``json_object``: any JSON object; ``json_schema``: {"name", "schema", "strict"}: that schema, with
    no properties beyond those it lists when strict (OpenAI's structured outputs require that)."""
    import llguidance

    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format json_schema needs {\"name\": ..., \"schema\": {...}}")
        schema = spec.get("schema") or {"type": "object"}
    else:
        raise GrammarError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    try:
        if kind == "json_schema" and response_format["json_schema"].get("strict"):
            schema = closed_objects(schema)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the JSON schema cannot be used: {error}")
    return grammar


def tool_call_grammar(functions: list[dict], mode: str, name: str | None = None, parallel: bool = True) -> str:
    """The grammar of a reply that may or must call ``functions`` (OpenAI's function definitions):
    `` <tool_call>`` and a JSON list of {"name", "arguments"} whose arguments validate against the
    function's parameters, no others (chat.py's format). ``mode`` "required": some call(s); "function": one
    call of ``name``; "auto": either that or text (which then may not start with "<"). One call
    only unless ``parallel``."""
    import llguidance

    def call(function: dict) -> dict:
        # no properties beyond those declared, strict or not: a call names only its parameters (and
        # a weak model is not free to invent keys until max_tokens)
        parameters = closed_objects(function.get("parameters") or {"type": "object", "properties": {}})
        return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"], "additionalProperties": False}
    chosen = [f for f in functions if mode != "function" or f["name"] == name]
    calls = {"type": "array", "items": {"anyOf": [call(f) for f in chosen]}, "minItems": 1,
             "x-guidance": JSON_LAYOUT}
    if mode == "function" or not parallel:
        calls["maxItems"] = 1
    rules = f'calls: " {TOOL_CALL_TAG}" %json {json.dumps(calls)}\n'
    start = "start: calls | text\ntext: / [^<](.|\\n)*/\n" if mode == "auto" else "start: calls\n"
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(start + rules)
    except (ValueError, TypeError, RuntimeError) as exc:    # its first line says what; the rest quotes the grammar
        raise GrammarError(f"the tools' parameter schemas cannot be used: {str(exc).splitlines()[0]}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the tools' parameter schemas cannot be used: {error}")
    return grammar


DATA_KEYWORDS = ("const", "enum", "default", "examples")   # values, not schemas: left as they are


def closed_objects(schema: dict) -> dict:
    """``schema`` with ``additionalProperties: false`` on every object that does not say otherwise."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                node.setdefault("additionalProperties", False)
            for key, value in node.items():
                if key not in DATA_KEYWORDS:
                    visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
    visit(schema)
    return schema


@functools.lru_cache(maxsize=4)
def _grammar_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of the vocabulary (~0.1 s to build, so once per tokenizer)."""
    import llguidance

    class Vocabulary:   # what llguidance.TokenizerWrapper reads
        def __init__(self):
            self.tokens = [tokenizer.token_bytes(i) or b"" for i in range(tokenizer.vocab_size)]
            self.eos_token_id = tokenizer.eot_id
            self.bos_token_id = None
            # end-of-text and tokens without bytes are never part of the text
            self.special_token_ids = [tokenizer.eot_id] + [i for i, b in enumerate(self.tokens) if not b]

        def __call__(self, text):
            return tokenizer.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=tokenizer.vocab_size)


def check_grammar(tokenizer: Tokenizer, grammar: str) -> None:
    """Raise GrammarError if the matcher cannot be built for ``grammar`` (at the boundary)."""
    Constraint(tokenizer, grammar)


class Constraint:
    """One request's matcher: which tokens may come next, and the tokens that came."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        import llguidance

        self._matcher = llguidance.LLMatcher(_grammar_tokenizer(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {self._matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size

    def fill(self, bitmask, row: int) -> None:
        """Write the allowed next tokens into ``bitmask`` [rows, ceil(V / 32)] int32 (numpy), row ``row``."""
        import llguidance.numpy

        llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The output is a complete document and nothing but end-of-text may follow."""
        return self._matcher.is_stopped()


_BITS = torch.arange(32, dtype=torch.int32)


def mask_logits(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> torch.Tensor:
    """``logits`` [B, V] with every token the constraint of row ``rows[i]`` forbids set to -inf."""
    import llguidance.numpy

    vocab = constraints[0].vocab_size     # the tokenizer's; a model may have more logits (padding rows)
    bitmask = llguidance.numpy.allocate_token_bitmask(len(rows), vocab)
    for i, constraint in enumerate(constraints):
        constraint.fill(bitmask, i)
    allowed = ((torch.from_numpy(bitmask).unsqueeze(-1) >> _BITS) & 1).bool().view(len(rows), -1)[:, :vocab]
    allowed = F.pad(allowed[:, :logits.shape[-1]], (0, max(0, logits.shape[-1] - vocab)), value=False)
    index = torch.tensor(rows, device=logits.device)
    logits = logits.clone()
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits
