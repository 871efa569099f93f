"""What the HTTP layer asks of whatever runs the model: a ``Backend``.

One process serves through ``LocalBackend`` (an Engine in this process); Ray Serve replicas serve
through ``replicas.ReplicaBackend`` (engines in other processes). Routes, admission, streaming and
metrics see only this interface, so every promise of the API holds the same way for both.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

import torch

from ..config import ModelConfig
from ..heads import (ScoredToken, SequenceClassifier, Tagged, TaggingWindow, TokenClassifier, mean_pooled_embeddings,
                     prompt_logprobs)
from ..inference.engine import Engine, EngineStopped, TokenEvent
from ..inference.sampling import SamplingParams
from ..tokenizer import Tokenizer
from .metrics import engine_load


class ReplicaLost(EngineStopped):
    """The process decoding a request died after it had sent tokens, so it cannot be retried
    without repeating them."""


class Handle(Protocol):
    """One request's events (the last has a finish_reason); ``cancel`` frees its engine row."""
    finished: bool
    submitted_at: float

    def cancel(self) -> None: ...
    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...


class Backend(Protocol):
    tokenizer: Tokenizer
    model_config: ModelConfig
    max_seq_len: int
    labels: list[str] | None            # the classification head's labels, None without a head
    tagger: dict | None                 # the token-classification head's config.json["head"]: labels, context, ...

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None: ...
    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle: ...
    async def embed(self, token_lists: list[list[int]]) -> torch.Tensor: ...
    async def classify(self, token_lists: list[list[int]]) -> torch.Tensor: ...
    async def tag(self, sentences: list[list[TaggingWindow]]) -> list[Tagged]:
        """Each sentence's tags and how sure the tagger is of each (TokenClassifier.tag; a sentence
        is given as its windows, heads.tagging_windows, and decoded whole)."""
    async def score(self, token_lists: list[list[int]], top: int) -> list[list[ScoredToken]]: ...
    def loads(self) -> dict[str | None, dict[str, float]]:
        """Each engine's numbers for metrics.EngineLoads, by replica (None: the only engine; replicas
        add their "pid"); empty while no engine has reported."""
    def start(self) -> None: ...
    def shutdown(self) -> None: ...


class LocalBackend:
    """An Engine in this process (and the checkpoint's task head over the same weights). The
    engine's loop runs on a thread of its own when ``start_engine``, else its owner runs it (`gptstack
    serve` keeps it on the main thread)."""

    def __init__(self, engine: Engine, classifier: SequenceClassifier | TokenClassifier | None = None,
                 start_engine: bool = True):
        self.engine, self.classifier, self.start_engine = engine, classifier, start_engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model.config
        self.max_seq_len = engine.max_seq_len
        self.labels = classifier.labels if isinstance(classifier, SequenceClassifier) else None
        self.tagger = classifier.head_config() if isinstance(classifier, TokenClassifier) else None

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.check(prompt_ids, params)

    async def submit(self, prompt_ids: list[int], params: SamplingParams):
        return self.engine.submit(prompt_ids, params)

    async def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        model = self.engine.model    # shares the engine's weights: runs on its thread between steps
        return await asyncio.wrap_future(self.engine.call(lambda: mean_pooled_embeddings(model, token_lists)))

    async def classify(self, token_lists: list[list[int]]) -> torch.Tensor:
        if not isinstance(self.classifier, SequenceClassifier):
            raise ValueError("this model has no classification head")
        classifier = self.classifier
        return await asyncio.wrap_future(self.engine.call(lambda: classifier.predict(token_lists)))

    async def tag(self, sentences: list[list[TaggingWindow]]) -> list[Tagged]:
        if not isinstance(self.classifier, TokenClassifier):
            raise ValueError("this model has no token-classification head")
        tagger = self.classifier
        return await asyncio.wrap_future(self.engine.call(lambda: tagger.tag(sentences)))

    async def score(self, token_lists: list[list[int]], top: int) -> list[list[ScoredToken]]:
        model = self.engine.model
        return await asyncio.wrap_future(self.engine.call(lambda: prompt_logprobs(model, token_lists, top)))

    def loads(self) -> dict[str | None, dict[str, float]]:
        # None: the one engine, no replica label; nothing once its loop has failed (not ready)
        return {} if self.engine.failure is not None else {None: engine_load(self.engine)}

    def start(self) -> None:
        if self.start_engine:
            self.engine.start()

    def shutdown(self) -> None:
        self.engine.shutdown()
