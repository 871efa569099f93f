"""POST /v1/classify: labels from the checkpoint's classification head, which shares the engine's
weights and so runs on the engine's thread between two decode steps."""

from __future__ import annotations

import asyncio

from fastapi import Request

from ...heads import classification_ids
from ...inference.engine import EngineStopped, QueueFull
from ..admission import charge, check_model
from ..errors import APIError, overloaded
from ..schemas import ClassifyRequest, response_head
from ..state import StateDep


async def classify(body: ClassifyRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    classifier = state.classifier
    if classifier is None:
        raise APIError(404, f"model {state.config.model_name!r} has no classification head; serve a checkpoint "
                       "made by `gptstack finetune --task classification`", code="no_classifier")
    ids = [classification_ids(state.tokenizer, text, state.engine.model.config.block_size) for text in body.input]
    tokens = sum(len(i) for i in ids)
    charge(state, request, tokens, "send fewer or shorter texts", "input")
    try:
        probs = await asyncio.wrap_future(state.engine.call(lambda: classifier.predict(ids)))
    except (QueueFull, EngineStopped) as exc:
        raise overloaded(exc) from None
    labels = classifier.labels
    data = [{"index": i, "label": labels[int(row.argmax())], "score": float(row.max()),
             "scores": {label: float(p) for label, p in zip(labels, row)}} for i, row in enumerate(probs)]
    return {**response_head("clf", "list", state.config.model_name), "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
