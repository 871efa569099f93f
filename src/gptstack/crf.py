"""A linear-chain conditional random field over per-word label scores (Lafferty et al. 2001), the
output layer of a :class:`~gptstack.heads.TokenClassifier` with ``crf``.

A softmax head picks each word's tag on its own, so it can start an entity at one word and give
the next word another type's I- tag; a CRF scores whole tag sequences (the words' scores plus a
learned score for each pair of neighbouring tags, for the first tag and for the last) and is
trained on the probability of the whole gold sequence (the forward algorithm sums over every
other). Moves the tag scheme never makes (an I-x that does not follow B-x or I-x; in BIOES also a
B-x or I-x not followed by its I-x or E-x) get a score of ``FORBIDDEN``, so Viterbi decoding never
outputs them and training puts no mass on them. All arithmetic is in fp32, whatever the model's dtype.
:func:`viterbi` with :func:`scheme_potentials` (the same constraints, no learned scores) decodes a
softmax head's log-probabilities into the best well-formed sequence: a CRF's decoding without its training.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data.conll import scheme_of

# finite, not -inf: a label no path can reach would otherwise turn logsumexp's gradient into NaN
FORBIDDEN = -1e4


def allowed_moves(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tags may start a sentence [K], follow each tag [K, K] (row: the earlier tag) and end
    a sentence [K], in the BIO or BIOES scheme of ``labels``."""
    bioes = scheme_of(labels) == "bioes"

    def may_follow(prev: str, tag: str) -> bool:
        continues = prev[0] in "BI" and prev[2:] == tag[2:]
        if tag[0] in "IE":
            return continues
        return not (bioes and prev[0] in "BI")          # a BIOES entity must end with E- first

    start = torch.tensor([tag[0] not in "IE" for tag in labels])
    follow = torch.tensor([[may_follow(prev, tag) for tag in labels] for prev in labels])
    end = torch.tensor([not (bioes and tag[0] in "BI") for tag in labels])
    return start, follow, end


class CRF(nn.Module):
    """Scores ``[B, L, K]`` of B sentences padded to L words, with ``mask`` [B, L] marking the
    real words (each sentence at least one, from the start)."""

    def __init__(self, labels: list[str]):
        super().__init__()
        k = len(labels)
        self.transitions = nn.Parameter(torch.zeros(k, k))    # [earlier tag, later tag]
        self.start = nn.Parameter(torch.zeros(k))
        self.end = nn.Parameter(torch.zeros(k))
        for name, allowed in zip(("start_allowed", "follow_allowed", "end_allowed"), allowed_moves(labels)):
            self.register_buffer(name, allowed, persistent=False)    # rebuilt from the labels, never stored

    def potentials(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start [K], transitions [K, K], end [K]) with the scheme's forbidden moves at FORBIDDEN."""
        return (self.start.float().masked_fill(~self.start_allowed, FORBIDDEN),
                self.transitions.float().masked_fill(~self.follow_allowed, FORBIDDEN),
                self.end.float().masked_fill(~self.end_allowed, FORBIDDEN))

    def nll(self, scores: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-log p(tags | scores) of each sentence [B]; ``tags`` [B, L] (any value where ``mask`` is False)."""
        scores = scores.float()
        start, transitions, end = self.potentials()
        tags = tags.masked_fill(~mask, 0)
        real = mask.float()
        emitted = (scores.gather(2, tags[..., None])[..., 0] * real).sum(1)
        moved = (transitions[tags[:, :-1], tags[:, 1:]] * real[:, 1:]).sum(1)
        last = tags.gather(1, mask.sum(1, keepdim=True) - 1)[:, 0]
        gold = start[tags[:, 0]] + emitted + moved + end[last]
        return self._forward(scores, mask)[-1] - gold

    def _forward(self, scores: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The forward algorithm: log alpha [B, K] at each position (kept as is past a sentence's
        end), and last the log partition function [B]."""
        start, transitions, end = self.potentials()
        alphas = [start + scores[:, 0]]
        for t in range(1, scores.shape[1]):
            step = torch.logsumexp(alphas[-1][:, :, None] + transitions, dim=1) + scores[:, t]
            alphas.append(torch.where(mask[:, t, None], step, alphas[-1]))
        return [*alphas, torch.logsumexp(alphas[-1] + end, dim=1)]

    def marginals(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """p(word t has tag k | scores) [B, L, K] by forward-backward: how sure the CRF is of each tag."""
        scores = scores.float()
        _, transitions, end = self.potentials()
        *alphas, log_z = self._forward(scores, mask)
        betas = [end.expand_as(alphas[0])]
        for t in range(scores.shape[1] - 2, -1, -1):
            step = torch.logsumexp(transitions + (scores[:, t + 1] + betas[0])[:, None, :], dim=2)
            betas.insert(0, torch.where(mask[:, t + 1, None], step, end.expand_as(step)))
        # at most 1, which rounding in alpha and beta (sums of tens) can pass by a few 1e-6 for a sure tag
        return torch.exp(torch.stack(alphas, 1) + torch.stack(betas, 1) - log_z[:, None, None]).clamp_(max=1.0)

    def viterbi(self, scores: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The most likely tag sequence of each sentence, as long as the sentence."""
        return viterbi(scores, mask, *self.potentials())


def scheme_potentials(labels: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(start, transitions, end) that only forbid the scheme's impossible moves: :func:`viterbi`
    over a softmax head's log-probabilities with these is constrained decoding without a CRF."""
    return tuple(torch.zeros(allowed.shape, device=device).masked_fill(~allowed.to(device), FORBIDDEN)
                 for allowed in allowed_moves(labels))


def viterbi(scores: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, transitions: torch.Tensor,
            end: torch.Tensor) -> list[list[int]]:
    """The best-scoring tag sequence of each sentence ([B, L, K] scores, [B, L] mask), as long as the
    sentence, under start [K], transition [K, K] and end [K] scores."""
    scores = scores.float()
    best, pointers = start + scores[:, 0], []
    stay = torch.arange(scores.shape[2], device=scores.device).expand_as(best)
    for t in range(1, scores.shape[1]):
        value, came_from = (best[:, :, None] + transitions).max(dim=1)
        best = torch.where(mask[:, t, None], value + scores[:, t], best)
        pointers.append(torch.where(mask[:, t, None], came_from, stay))   # past the end: stay put
    tag = (best + end).argmax(dim=1)
    path = [tag]
    for came_from in reversed(pointers):
        tag = came_from.gather(1, tag[:, None])[:, 0]
        path.insert(0, tag)
    lengths = mask.sum(1).tolist()
    return [row[:n] for row, n in zip(torch.stack(path, 1).tolist(), lengths)]
