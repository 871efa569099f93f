"""POST /tokenize and /detokenize (vLLM's extras): what the model sees of a prompt or a chat."""

from __future__ import annotations

from ..admission import check_model
from ..errors import APIError
from ..schemas import DetokenizeRequest, TokenizeRequest, tool_dicts
from ..state import StateDep


async def tokenize(body: TokenizeRequest, state: StateDep):
    check_model(state, body.model)
    given = body.model_fields_set & {"prompt", "messages"}
    if len(given) != 1 or getattr(body, given.pop()) is None:
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    text = body.prompt if body.prompt is not None else state.render_chat(body.messages, tool_dicts(body.tools))
    ids = state.tokenizer.encode(text)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.backend.max_seq_len}


async def detokenize(body: DetokenizeRequest, state: StateDep):
    check_model(state, body.model)
    vocab_size = state.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary of {vocab_size}", param="tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}
