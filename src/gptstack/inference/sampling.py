"""Choosing the next token from logits, for a whole batch at once with per-row settings.

Order of operations per row (as in vLLM / Hugging Face): penalties on the raw logits, then
temperature, then top-k, top-p and min-p filtering, then a draw. Draws use each request's own
generator through the exponential race (argmax p / E, E ~ Exp(1)), which is a multinomial draw
whose randomness belongs to the row: a seeded request gives the same text alone or in any batch.
The E come from a counter-based generator keyed once per row and step by the row's generator
(:func:`draw`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import library


@dataclass
class SamplingParams:
    max_new_tokens: int = 128         # tokens to generate at most
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # drop tokens below min_p * p(most likely); 0 = off
    presence_penalty: float = 0.0     # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0    # OpenAI: subtract per occurrence in the generated text
    repetition_penalty: float = 1.0   # CTRL / HF: divide (>0) or multiply (<0) logits of seen tokens
    seed: int | None = None           # the same seed gives the same text, alone or in any batch
    stop: list[str] = field(default_factory=list)              # stop before this text
    stop_token_ids: list[int] = field(default_factory=list)    # stop at this token, as at end-of-text
    ignore_eos: bool = False          # go on past end-of-text
    logprobs: int | None = None       # also return this many top alternatives per token (0 = chosen only)
    logit_bias: dict[int, float] = field(default_factory=dict)   # added to a token's logit, in [-100, 100]
    grammar: str | None = None        # output constrained to this grammar (structured.response_format_grammar)

    def validate(self) -> "SamplingParams":
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, seen: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; output_counts [B, V] (generated tokens); seen [B, V] bool (prompt + output)."""
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled logits with everything outside each row's top-k / top-p / min-p set to -inf.

    logits [B, V]; temperature, top_p, min_p [B] float; top_k [B] long (0 = off).
    """
    logits = logits.float() / temperature.clamp(min=1e-6)[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = ranks[None, :] >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already hold top_p of the mass
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    if min_p is not None:
        drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator] | torch.Generator | None = None,
           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row [B]; rows with temperature 0 take the argmax.

    ``generators`` is one generator per row (or one for all rows, or None for the global one).
    """
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    filtering = bool((top_k > 0).any() or (top_p < 1).any() or (min_p is not None and (min_p > 0).any()))
    scaled = filter_logits(logits, temperature, top_k, top_p, min_p) if filtering \
        else logits.float() / temperature.clamp(min=1e-6)[:, None]
    drawn = draw(scaled.softmax(dim=-1), generators)
    return torch.where(greedy, logits.argmax(dim=-1), drawn) if bool(greedy.any()) else drawn   # no argmax unasked


def draw(probs: torch.Tensor, generators: list[torch.Generator] | torch.Generator | None) -> torch.Tensor:
    """A token per row of ``probs`` [B, V] by the exponential race, argmax p_i / E_i: the C++ op
    on CPU (csrc/race_sample.cpp), else :func:`race_sample_reference`. Each row's E_i come from a
    counter-based generator keyed by one number drawn from the row's generator (see the C++ file
    for why: an Exp(1) per token from a torch.Generator cost ~1 ms a row)."""
    if not isinstance(generators, (list, tuple)):
        generators = [generators] * probs.shape[0]
    keys = torch.stack([torch.randint(0, 2 ** 62, (), generator=g, device=probs.device) for g in generators])
    if library is not None and probs.device.type == "cpu":
        return library.race_sample(probs.float(), keys)
    return race_sample_reference(probs, keys)


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN, MIX_1, MIX_2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def race_uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float64 U(0, 1) numbers of the race, as csrc/race_sample.cpp makes them: splitmix64
    of key + (i + 1) * golden (int64 arithmetic wraps as uint64 does), its top 53 bits."""
    index = torch.arange(vocab, device=keys.device)
    z = keys[:, None] + (index + 1) * GOLDEN
    z = (z ^ _shift_right(z, 30)) * MIX_1
    z = (z ^ _shift_right(z, 27)) * MIX_2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).double() + 0.5) * 2.0 ** -53


def race_sample_reference(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The race of csrc/race_sample.cpp in PyTorch ops, on the same random numbers."""
    exponentials = -torch.log(race_uniforms(keys, probs.shape[-1]))
    return (probs.double() / exponentials).masked_fill(probs <= 0, -1.0).argmax(dim=-1)
