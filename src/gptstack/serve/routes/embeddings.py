"""POST /v1/embeddings: mean-pooled, unit-length final hidden states of the served model (computed
where the model lives: see Backend.embed)."""

from __future__ import annotations

import base64

from fastapi import Request

from ..admission import charge, check_model
from ..errors import APIError
from ..schemas import EmbeddingRequest
from ..state import StateDep


async def embeddings(body: EmbeddingRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    config = state.backend.model_config
    if body.dimensions is not None and body.dimensions != config.n_embd:
        raise APIError(400, f"dimensions must be {config.n_embd} (this model's width) or unset; "
                       f"shortened embeddings are not supported", param="dimensions")
    ids = [state.tokenizer.encode(item) if isinstance(item, str) else list(item) for item in body.input]
    vocab, context = config.vocab_size, config.block_size
    for i, tokens in enumerate(ids):
        if not tokens:
            raise APIError(400, f"input {i} has no tokens", param="input")
        if len(tokens) > context:
            raise APIError(400, f"input {i} has {len(tokens)} tokens, more than the context of {context}; "
                           "shorten or split it", param="input")
        if not all(0 <= t < vocab for t in tokens):
            raise APIError(400, f"input {i} has token ids outside the vocabulary of {vocab}", param="input")
    tokens = sum(map(len, ids))
    await charge(state, request, tokens, "send fewer or shorter inputs", "input")
    vectors = await state.backend.embed(ids)   # a full queue or a stopped engine: 503 (errors.py)

    def encoded(vector) -> list[float] | str:     # base64: the little-endian float32 bytes, as OpenAI sends
        if body.encoding_format == "base64":
            return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        return vector.tolist()

    return {"object": "list", "model": state.config.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
