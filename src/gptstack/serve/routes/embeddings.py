"""POST /v1/embeddings: mean-pooled, unit-length final hidden states of the served model. The
forward shares the engine's weights, so it runs on the engine's thread between two decode steps."""

from __future__ import annotations

import asyncio
import base64

from fastapi import Request

from ...heads import mean_pooled_embeddings
from ...inference.engine import EngineStopped, QueueFull
from ..admission import charge, check_model
from ..errors import APIError, overloaded
from ..schemas import EmbeddingRequest
from ..state import StateDep


async def embeddings(body: EmbeddingRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    model = state.engine.model
    if body.dimensions is not None and body.dimensions != model.config.n_embd:
        raise APIError(400, f"dimensions must be {model.config.n_embd} (this model's width) or unset; "
                       f"shortened embeddings are not supported", param="dimensions")
    ids = [state.tokenizer.encode(item) if isinstance(item, str) else list(item) for item in body.input]
    vocab, context = model.config.vocab_size, model.config.block_size
    for i, tokens in enumerate(ids):
        if not tokens:
            raise APIError(400, f"input {i} has no tokens", param="input")
        if len(tokens) > context:
            raise APIError(400, f"input {i} has {len(tokens)} tokens, more than the context of {context}; "
                           "shorten or split it", param="input")
        if not all(0 <= t < vocab for t in tokens):
            raise APIError(400, f"input {i} has token ids outside the vocabulary of {vocab}", param="input")
    tokens = sum(map(len, ids))
    charge(state, request, tokens, "send fewer or shorter inputs", "input")
    try:
        vectors = await asyncio.wrap_future(state.engine.call(lambda: mean_pooled_embeddings(model, ids)))
    except (QueueFull, EngineStopped) as exc:
        raise overloaded(exc) from None

    def encoded(vector) -> list[float] | str:     # base64: the little-endian float32 bytes, as OpenAI sends
        if body.encoding_format == "base64":
            return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        return vector.tolist()

    return {"object": "list", "model": state.config.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
