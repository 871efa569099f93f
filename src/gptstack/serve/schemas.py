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
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from ..inference.sampling import SamplingParams


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: StrictBool = False     # a last chunk with the usage, before [DONE]


class SamplingFields(StrictModel):
    model: StrictStr
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, validate_default=True)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[int, float] | None = None   # token id (a JSON key: a string of digits) -> bias
    # vLLM-style extras
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _clamped(cls, value):
        """Clamped to [-100, 100], as OpenAI does; -100 bans a token, +100 all but forces it."""
        if value and not all(math.isfinite(v) for v in value.values()):
            raise ValueError("logit_bias values must be finite numbers")
        return {token: min(100.0, max(-100.0, bias)) for token, bias in (value or {}).items()}

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
    prompt: Union[StrictStr, list[StrictStr], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)   # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)     # candidates per prompt; the n of highest logprob per token return

    def sampling_params(self, sample: int, chosen_logprobs: bool = False) -> SamplingParams:
        """``chosen_logprobs``: report each token's logprob even if the request did not ask (best_of)."""
        logprobs = self.logprobs if not chosen_logprobs or self.logprobs is not None else 0
        return self._sampling_params(sample, 16 if self.max_tokens is None else self.max_tokens, self.stop, logprobs)


class TextContent(StrictModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextContent], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
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


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    def sampling_params(self, sample: int, context_left: int, chat_stops: list[str]) -> SamplingParams:
        """Without a max_tokens the reply may fill the rest of the context (``context_left`` tokens)."""
        max_new_tokens = self.max_completion_tokens or self.max_tokens or context_left
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(sample, max_new_tokens, self.stop + chat_stops, logprobs)


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None


class ClassifyRequest(StrictModel):
    """POST /v1/classify: one text or a list of them (gptstack's own route, shaped like /v1/embeddings)."""
    model: str | None = None
    input: Union[StrictStr, list[StrictStr]] = Field(...)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        if len(texts) > 256:
            raise ValueError(f"at most 256 texts per request, got {len(texts)}")
        if any(not t.strip() for t in texts):
            raise ValueError("texts must not be empty")
        return texts


class EmbeddingRequest(StrictModel):
    """POST /v1/embeddings: texts or token id lists, as OpenAI takes them."""
    model: StrictStr
    input: Union[StrictStr, list[StrictStr], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, str):
            value = [value]
        if not value:
            raise ValueError("give at least one input")
        if len(value) > 2048:
            raise ValueError(f"at most 2048 inputs per request, got {len(value)}")
        if isinstance(value[0], int):
            value = [value]
        if any(len(item) == 0 for item in value):
            raise ValueError("inputs must not be empty")
        return value


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def response_head(prefix: str, object_: str, model: str) -> dict:
    """The fields every OpenAI response (and each of its stream chunks) starts with."""
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": object_, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
