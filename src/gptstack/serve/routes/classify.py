"""POST /v1/classify: labels from the checkpoint's classification head (run where the model lives:
see Backend.classify)."""

from __future__ import annotations

from fastapi import Request

from ...heads import classification_ids
from ..admission import charge, check_model
from ..errors import APIError
from ..schemas import ClassifyRequest, response_head
from ..state import StateDep


async def classify(body: ClassifyRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    labels = state.backend.labels
    if not labels:
        raise APIError(404, f"model {state.config.model_name!r} has no classification head; serve a checkpoint "
                       "made by `gptstack finetune --task classification`", code="no_classifier")
    ids = [classification_ids(state.tokenizer, text, state.backend.model_config.block_size) for text in body.input]
    tokens = sum(len(i) for i in ids)
    await charge(state, request, tokens, "send fewer or shorter texts", "input")
    probs = await state.backend.classify(ids)   # a full queue or a stopped engine: 503 (errors.py)
    data = [{"index": i, "label": labels[int(row.argmax())], "score": float(row.max()),
             "scores": {label: float(p) for label, p in zip(labels, row)}} for i, row in enumerate(probs)]
    return {**response_head("clf", "list", state.config.model_name), "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
