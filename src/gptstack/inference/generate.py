"""Generating text from one prompt with the KV cache, streamed piece by piece.

The cache is allocated once for the whole context; prefill writes the prompt, then each decode
step feeds one token. When the context fills up, the last half of it is kept and re-prefilled
into a fresh cache (a "context shift"), so a small-context model can write on.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..model import GPT, KVCache
from ..tokenizer import IncrementalDecoder, Tokenizer
from .sampling import SamplingParams, sample


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that might begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i != -1]
        if hits:
            text, self.pending = self.pending[:min(hits)], ""
            return text, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


@torch.no_grad()
def generate_tokens(model: GPT, prompt_ids: list[int], params: SamplingParams,
                    device: torch.device | str = "cpu") -> Iterator[int]:
    """Token ids after the prompt, one at a time, until max_new_tokens or a stop token id."""
    params.validate()
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    block = model.config.block_size
    cache_dtype = next(model.parameters()).dtype
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    temperature = torch.tensor([params.temperature], device=device)
    top_k = torch.tensor([params.top_k], device=device)
    top_p = torch.tensor([params.top_p], device=device)
    stop_ids = set(params.stop_token_ids)

    context = list(prompt_ids[-block:])
    cache = KVCache.allocate(model.config, 1, block, device=device, dtype=cache_dtype)
    feed, pos = context, 0
    for _ in range(params.max_new_tokens):
        if pos + len(feed) > block:   # context shift: keep the newest half, recompute its cache
            context = context[-(block // 2):]
            feed, pos = context, 0
        idx = torch.tensor([feed], device=device)
        positions = torch.arange(pos, pos + len(feed), device=device)[None]
        logits, _ = model(idx, cache=cache, positions=positions, last_only=True)
        token = int(sample(logits[:, -1], temperature, top_k, top_p, generator))
        pos += len(feed)
        if token in stop_ids:
            return
        yield token
        context.append(token)
        feed = [token]


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                  device: torch.device | str = "cpu") -> Iterator[str]:
    """Text pieces as they are generated: never a broken UTF-8 character, stop strings removed."""
    decoder, stops = IncrementalDecoder(tokenizer), StopMatcher(params.stop)
    for token in generate_tokens(model, tokenizer.encode(prompt), params, device):
        text, stopped = stops.push(decoder.push(token))
        if text:
            yield text
        if stopped:
            return
    text, stopped = stops.push(decoder.flush())
    tail = text if stopped else text + stops.flush()
    if tail:
        yield tail
