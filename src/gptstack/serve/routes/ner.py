"""POST /v1/ner: named entities from the checkpoint's token-classification head, with character
offsets into each input (run where the model lives: see Backend.tag)."""

from __future__ import annotations

from fastapi import Request

from ...data.conll import entity_spans, split_words
from ...heads import tagging_windows
from ..admission import charge, check_model
from ..errors import APIError
from ..schemas import NERRequest, response_head
from ..state import StateDep


async def ner(body: NERRequest, request: Request, state: StateDep):
    check_model(state, body.model)
    tagger = state.backend.tagger
    if not tagger:
        raise APIError(400, f"model {state.config.model_name!r} has no token-classification head; serve a "
                       "checkpoint made by `gptstack finetune --task token_classification`",
                       param="model", code="no_token_classifier")
    words = [split_words(text) for text in body.input]     # every input holds a non-space character: a word
    block = state.backend.model_config.block_size
    sentences = [tagging_windows(state.tokenizer, [w for w, _, _ in ws], tagger["context"], block) for ws in words]
    tokens = sum(len(w.ids) for windows in sentences for w in windows)
    await charge(state, request, tokens, "send fewer or shorter texts", "input")
    tagged = await state.backend.tag(sentences)    # a full queue or a stopped engine: 503 (errors.py)
    data = [{"index": i, "entities": entities(text, ws, path, sure, tagger["labels"])}
            for i, (text, ws, (path, sure)) in enumerate(zip(body.input, words, tagged))]
    return {**response_head("ner", "list", state.config.model_name), "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def entities(text: str, words: list[tuple[str, int, int]], path: list[int], sure, labels: list[str]) -> list[dict]:
    """The entities the tagger's tags mark, as character spans of ``text``; the score is the mean
    probability of the chosen tags over the entity's words (Backend.tag)."""
    spans = entity_spans([labels[i] for i in path])
    return [{"type": kind, "text": text[words[s][1]:words[e - 1][2]], "start": words[s][1], "end": words[e - 1][2],
             "score": float(sure[s:e].mean())} for kind, s, e in spans]
