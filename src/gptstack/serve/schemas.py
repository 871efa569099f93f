"""OpenAI request and response shapes (the subset the official client uses), as pydantic models.

Requests forbid unknown fields, so a misspelt parameter is a 400 naming it rather than silently
ignored. A few vLLM-style extras (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos)
are accepted on both routes. Both requests turn themselves into the engine's SamplingParams.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, StringConstraints, field_validator

from ..inference.sampling import SamplingParams


class StrictModel(BaseModel):
    """Unknown fields are refused, and values must have the JSON type the document gives them
    (no "1" for 1): what the server accepts is what /openapi.json says."""
    model_config = ConfigDict(extra="forbid", strict=True)


def only_if(*rules: tuple[dict, dict]):
    """A model's json_schema_extra stating rules between its fields that the routes check, as
    JSON Schema if/then pairs, so the document says what the server refuses."""
    def extra(schema: dict) -> None:
        schema["allOf"] = [{"if": condition, "then": consequence} for condition, consequence in rules]
    return extra


def present(field: str, schema: dict | None = None) -> dict:
    """The condition "``field`` is given (and matches ``schema``)"."""
    return {"required": [field], "properties": {field: schema or {"not": {"type": "null"}}}}


STREAM_OPTIONS_NEED_STREAM = (present("stream_options"), present("stream", {"const": True}))


def whole_number(value):
    """JSON Schema's integers include 7995.0, which strict mode alone would refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(ge: int | None = None, le: int | None = None, **extra):      # noqa: N802 (a type, by use)
    """An integer field: its bounds in the schema, and whole floats taken (see whole_number)."""
    return Annotated[int, Field(ge=ge, le=le, **extra), BeforeValidator(whole_number)]


# a token id: the server's /openapi.json adds the vocabulary's bound where it finds the marker
TokenId = Int(ge=0, json_schema_extra={"x-token-id": True})
TokenIdKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]
NonBlank = Annotated[StrictStr, StringConstraints(pattern=r"\S")]    # a text with something in it


class StreamOptions(StrictModel):
    include_usage: StrictBool = False     # a last chunk with the usage, before [DONE]


class SamplingFields(StrictModel):
    model: StrictStr
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int(ge=1) = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[Annotated[StrictStr, Field(min_length=1)],
                Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=4)], None] = \
        Field(None, validate_default=True)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Int() | None = None
    user: str | None = None
    logit_bias: dict[TokenIdKey, float] | None = Field(   # token id (a JSON key: a string of digits) -> bias
        None, json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,9}$"}})
    # vLLM-style extras
    top_k: Int(ge=0) = 0
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return [value] if isinstance(value, str) else (value or [])

    @field_validator("logit_bias")
    @classmethod
    def _clamped(cls, value):
        """Token ids as ints, biases clamped to [-100, 100] as OpenAI does; -100 bans a token, +100
        all but forces it."""
        if value and not all(math.isfinite(v) for v in value.values()):
            raise ValueError("logit_bias values must be finite numbers")
        return {int(token): min(100.0, max(-100.0, bias)) for token, bias in (value or {}).items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, sample: int, max_new_tokens: int, stop: list[str],
                         logprobs: int | None) -> SamplingParams:
        """The engine's settings for sample number ``sample`` of the ``n`` asked for: each sample
        gets its own seed, so that the n samples of a seeded request differ from one another."""
        same_named = {name: getattr(self, name) for name in PASSED_THROUGH}
        return SamplingParams(**same_named, max_new_tokens=max_new_tokens, stop=stop, logprobs=logprobs,
                              seed=None if self.seed is None else self.seed + sample, logit_bias=self.logit_bias or {})


# the SamplingParams fields that a request sets as it is, under the same name
PASSED_THROUGH = sorted(({f.name for f in dataclasses.fields(SamplingParams)} & set(SamplingFields.model_fields))
                        - {"stop", "seed", "logit_bias"})


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=only_if(
        STREAM_OPTIONS_NEED_STREAM,     # and max_tokens 0 (scoring the prompt) needs echo, and is not streamed
        (present("max_tokens", {"const": 0}), {"required": ["echo"], "properties": {"echo": {"const": True},
                                                                                  "stream": {"const": False}}})))
    prompt: Union[Annotated[StrictStr, Field(min_length=1)],
                  Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)],
                  Annotated[list[TokenId], Field(min_length=1)],
                  Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]]
    max_tokens: Int(ge=0) | None = 16   # 0 with echo: score the prompt, generate nothing
    logprobs: Int(ge=0, le=5) | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: Int(ge=1) | None = None     # candidates per prompt; the n of highest logprob per token return

    def sampling_params(self, sample: int, chosen_logprobs: bool = False) -> SamplingParams:
        """``chosen_logprobs``: report each token's logprob even if the request did not ask (best_of)."""
        logprobs = self.logprobs if not chosen_logprobs or self.logprobs is not None else 0
        return self._sampling_params(sample, 16 if self.max_tokens is None else self.max_tokens, self.stop, logprobs)


class TextContent(StrictModel):
    type: Literal["text"]
    text: StrictStr


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: StrictStr
    arguments: StrictStr          # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant made, as a conversation sent back to the server carries it."""
    model_config = ConfigDict(extra="ignore", strict=True)
    id: StrictStr
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextContent], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None      # an assistant's calls
    tool_call_id: str | None = None               # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        """OpenAI's message shape with the content as one string (what chat templates read)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(StrictModel):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None      # a JSON schema; none: the function takes no arguments
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


def tool_dicts(tools: list[Tool] | None) -> list[dict] | None:
    """Tools in OpenAI's shape, as chat templates read them."""
    return [tool.model_dump(exclude_none=True) for tool in tools] if tools else None


class NamedFunction(StrictModel):
    name: StrictStr


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema")     # "schema" shadows a BaseModel attribute
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def as_dict(self) -> dict:
        """The shape structured.response_format_grammar reads."""
        spec = None if self.json_schema is None else {"name": self.json_schema.name, "strict": self.json_schema.strict,
                                                      "schema": self.json_schema.json_schema}
        return {"type": self.type, "json_schema": spec}


STRUCTURED = {"properties": {"type": {"enum": ["json_object", "json_schema"]}}}
NO_TOOLS = [{"not": {"required": ["tools"]}}, {"properties": {"tools": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}},
            present("tool_choice", {"const": "none"})]


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=only_if(
        STREAM_OPTIONS_NEED_STREAM,
        (present("top_logprobs"), present("logprobs", {"const": True})),
        (present("tool_choice", {"not": {"enum": ["none", None]}}), present("tools", {"type": "array", "minItems": 1})),
        (present("response_format", STRUCTURED), {"anyOf": NO_TOOLS}),       # tools or a response_format
        (present("response_format", {"properties": {"type": {"const": "json_schema"}}}),
         present("response_format", {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}))))
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int(ge=1) | None = None
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: StrictBool = False
    top_logprobs: Int(ge=0, le=20) | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: StrictBool = True

    @property
    def tool_dicts(self) -> list[dict] | None:
        return tool_dicts(self.tools)

    @property
    def tool_mode(self) -> tuple[str, str | None] | None:
        """How the reply may call tools: None (it may not), ("auto" | "required", None), or
        ("function", name): that one function."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "function", self.tool_choice.function.name
        return self.tool_choice or "auto", None

    def sampling_params(self, sample: int, context_left: int, chat_stops: list[str]) -> SamplingParams:
        """Without a max_tokens the reply may fill the rest of the context (``context_left`` tokens)."""
        max_new_tokens = self.max_completion_tokens or self.max_tokens or context_left
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(sample, max_new_tokens, self.stop + chat_stops, logprobs)


def prompt_or_messages(schema: dict) -> None:
    """The document says what the route checks: exactly one of prompt and messages, neither null."""
    for name in ("prompt", "messages"):
        schema["properties"][name] = next(s for s in schema["properties"][name]["anyOf"] if s.get("type") != "null")
    schema["oneOf"] = [{"required": ["prompt"], "not": {"required": ["messages"]}},
                       {"required": ["messages"], "not": {"required": ["prompt"]}}]


class TokenizeRequest(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=prompt_or_messages)
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None           # with messages: the prompt a chat request with them gets


class ClassifyRequest(StrictModel):
    """POST /v1/classify: one text or a list of them (gptstack's own route, shaped like /v1/embeddings)."""
    model: str | None = None
    input: Union[NonBlank, Annotated[list[NonBlank], Field(min_length=1, max_length=256)]]

    @field_validator("input")
    @classmethod
    def _listed(cls, value):
        return [value] if isinstance(value, str) else value


class NERRequest(ClassifyRequest):
    """POST /v1/ner: one text or a list of them, the same shape as /v1/classify takes."""


class EmbeddingRequest(StrictModel):
    """POST /v1/embeddings: texts or token id lists, as OpenAI takes them."""
    model: StrictStr
    input: Union[Annotated[StrictStr, Field(min_length=1)],
                 Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=2048)],
                 Annotated[list[TokenId], Field(min_length=1)],
                 Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                           Field(min_length=1, max_length=2048)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int(ge=1) | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _listed(cls, value):
        """A list of texts or of token lists."""
        if isinstance(value, str) or isinstance(value[0], int):
            return [value]
        return value


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenId]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def response_head(prefix: str, object_: str, model: str) -> dict:
    """The fields every OpenAI response (and each of its stream chunks) starts with."""
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": object_, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
