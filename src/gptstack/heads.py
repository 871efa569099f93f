"""Task heads on top of the GPT's hidden states, and embeddings from them.

``SequenceClassifier``: as in GPT-1's fine-tuning (Radford et al. 2018), a linear layer on the
final hidden state of the last real token of each sequence, after ``clf_pdrop`` dropout. Under
causal attention that token has seen the whole input, and right padding after it changes nothing,
so batches are padded on the right with no attention mask. Every text ends with an end-of-text
token, so the head always reads the same kind of token (GPT-1's "extract" token).

``TokenClassifier``: one label per word (named-entity tags), a linear layer over hidden states
read at each word's pieces. Words are encoded one by one with a leading space, as GPT-2's BPE sees
words inside a sentence, after an end-of-text token that stands for the sentence start. Under causal
attention a state sees only what came before it, so *where* a word is read matters (``context``,
measured on WNUT 2017 in docs/benchmarks.md): ``first`` (its first piece: the word is barely
seen), ``last`` (its last piece: the whole word and its left context), ``next`` (the last piece's
state beside the next word's first piece: one word of right context), ``echo`` (the sentence
twice, read in the second copy, whose states have seen the whole sentence once: bidirectional
context at twice the cost). Training reads the same states, so the loss is per word and a
word's other pieces are never labelled. On WNUT 2017 from the small demo model the four came out
within 0.015 entity F1 of each other (first best, inside run-to-run noise): that model's weakness
on tweets, not the reading position, is what limits it there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from .loss import linear_cross_entropy
from .model import GPT
from .tokenizer import Tokenizer


def classification_ids(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[int]:
    """The tokens a classifier reads for ``text``: its first ``max_tokens - 1`` tokens and end-of-text."""
    return tokenizer.encode(text)[:max_tokens - 1] + [tokenizer.eot_id]


class SequenceClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str]):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {labels}")
        self.gpt, self.labels = gpt, list(labels)
        self.dropout = nn.Dropout(gpt.config.clf_pdrop)
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, with_lm_loss: bool = False):
        """Logits [B, num_labels] for right-padded ``idx`` [B, T] whose row i has ``lengths[i]`` real
        tokens; ``with_lm_loss``: also the language-modelling loss on the same texts from the same
        forward pass (GPT-1's auxiliary objective during fine-tuning)."""
        hidden = self.gpt.hidden_states(idx)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        logits = self.head(self.dropout(last))
        if not with_lm_loss:
            return logits
        real = torch.arange(idx.shape[1], device=idx.device)[None] < lengths[:, None]
        targets = idx[:, 1:].masked_fill(~real[:, 1:], -100)      # padding is not predicted
        return logits, linear_cross_entropy(hidden[:, :-1], self.gpt.lm_head.weight, targets)

    def head_config(self) -> dict:
        """What config.json["head"] records: the kind of head and what it needs to be rebuilt."""
        return {"kind": "classification", "labels": self.labels}

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's weights under the names a checkpoint stores them by."""
        return {f"classifier.{k}": v for k, v in self.head.state_dict().items()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")})

    @torch.inference_mode()
    def predict(self, token_lists: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities [N, num_labels] for token lists made by :func:`classification_ids`."""
        self.eval()
        device = self.head.weight.device
        probs = []
        for start in range(0, len(token_lists), batch_size):
            idx, lengths = pad_right(token_lists[start:start + batch_size], device)
            probs.append(torch.softmax(self(idx, lengths).float(), dim=-1))
        return torch.cat(probs) if probs else torch.empty(0, len(self.labels))


TOKEN_CONTEXTS = ("first", "last", "next", "echo")


@dataclass
class TaggingWindow:
    """Consecutive words of one text as the tagger reads them: token ids, and for each word the
    positions of the states its label is read from (two for ``next``, else one)."""
    ids: list[int]
    where: list[list[int]]


def tagging_windows(tokenizer: Tokenizer, words: list[str], context: str, block_size: int) -> list[TaggingWindow]:
    """``words`` cut into as few windows as fit the context (a long text gives several, each read
    on its own); a word longer than a whole window keeps its first pieces."""
    if context not in TOKEN_CONTEXTS:
        raise ValueError(f"context must be one of {TOKEN_CONTEXTS}, got {context!r}")
    if any(not w or w.isspace() for w in words):
        raise ValueError("words must be non-empty and not only whitespace")
    eot = tokenizer.eot_id
    # pieces per window: end-of-text first; "next" adds one at the end (the last word's right
    # neighbour), "echo" holds the pieces twice, each copy after an end-of-text
    room = {"first": block_size - 1, "last": block_size - 1, "next": block_size - 2,
            "echo": (block_size - 2) // 2}[context]
    if room < 1:
        raise ValueError(f"a context of {block_size} tokens leaves no room to tag words with context {context!r}")
    pieces = [tokenizer.encode(" " + w)[:room] for w in words]
    windows, start = [], 0
    while start < len(pieces):
        end, used = start, 0
        while end < len(pieces) and used + len(pieces[end]) <= room:
            used += len(pieces[end])
            end += 1
        windows.append(_window(pieces[start:end], context, eot))
        start = end
    return windows


def _window(pieces: list[list[int]], context: str, eot: int) -> TaggingWindow:
    flat = [p for word in pieces for p in word]
    ends = list(itertools.accumulate(len(w) for w in pieces))   # one past each word's last piece, in flat
    if context == "echo":
        return TaggingWindow([eot, *flat, eot, *flat], [[len(flat) + 1 + e] for e in ends])
    if context == "first":
        return TaggingWindow([eot, *flat], [[1 + e - len(w)] for e, w in zip(ends, pieces)])
    if context == "last":
        return TaggingWindow([eot, *flat], [[e] for e in ends])
    return TaggingWindow([eot, *flat, eot], [[e, e + 1] for e in ends])


class TokenClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str], context: str):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a token classifier needs at least two labels, got {labels}")
        if context not in TOKEN_CONTEXTS:
            raise ValueError(f"context must be one of {TOKEN_CONTEXTS}, got {context!r}")
        self.gpt, self.labels, self.context = gpt, list(labels), context
        self.dropout = nn.Dropout(gpt.config.clf_pdrop)
        self.head = nn.Linear(gpt.config.n_embd * (2 if context == "next" else 1), len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Logits [B, W, num_labels] for right-padded ``idx`` [B, T] read at ``where`` [B, W, k]."""
        return self.head(self.dropout(self.features(idx, where)))

    def features(self, idx: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """What the head reads for each word: [B, W, k * n_embd], the states at ``where`` side by side."""
        hidden = self.gpt.hidden_states(idx)
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
        return hidden[rows, where].flatten(2)

    def head_config(self) -> dict:
        return {"kind": "token_classification", "labels": self.labels, "context": self.context}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {f"token_classifier.{k}": v for k, v in self.head.state_dict().items()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "token_classifier."
        self.head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    @torch.inference_mode()
    def predict(self, windows: list[TaggingWindow], batch_size: int = 32) -> list[torch.Tensor]:
        """Label probabilities [words, num_labels] of each window (made by :func:`tagging_windows`)."""
        self.eval()
        device = self.head.weight.device
        out = []
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            idx, where, counts = pad_windows(batch, device)
            probs = torch.softmax(self(idx, where).float(), dim=-1).cpu()
            out += [row[:n] for row, n in zip(probs, counts)]
        return out


def sentence_windows(tokenizer: Tokenizer, sentences: list[list[str]], context: str,
                     block_size: int) -> tuple[list[TaggingWindow], list[int]]:
    """Every sentence's windows, in order, and how many windows each one has (see :func:`joined`)."""
    per_sentence = [tagging_windows(tokenizer, words, context, block_size) for words in sentences]
    return [w for windows in per_sentence for w in windows], [len(windows) for windows in per_sentence]


def joined(window_outputs: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Per-window outputs [words, ...] joined back into one per sentence (``counts`` windows each)."""
    starts = [0, *itertools.accumulate(counts)]
    return [torch.cat(window_outputs[a:b]) for a, b in zip(starts, starts[1:])]


def pad_windows(windows: list[TaggingWindow], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ids [B, T], read positions [B, W, k] (padding words read position 0) and each
    window's number of words."""
    idx, _ = pad_right([w.ids for w in windows], device)
    counts = [len(w.where) for w in windows]
    where = torch.zeros(len(windows), max(counts), len(windows[0].where[0]), dtype=torch.long)
    for row, window in enumerate(windows):
        where[row, :len(window.where)] = torch.tensor(window.where)
    return idx, where.to(device), counts


@torch.inference_mode()
def mean_pooled_embeddings(gpt: GPT, token_lists: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """[N, n_embd] fp32 embeddings: each sequence's final hidden states averaged over its tokens, then
    scaled to unit length (so a dot product is the cosine similarity). Sequences are right-padded
    in batches; under causal attention the padding changes no real token's state."""
    out = []
    for start in range(0, len(token_lists), batch_size):
        idx, lengths = pad_right(token_lists[start:start + batch_size], gpt.transformer.wte.weight.device)
        hidden = gpt.hidden_states(idx).float()
        real = (torch.arange(idx.shape[1], device=idx.device) < lengths[:, None]).unsqueeze(-1)
        pooled = (hidden * real).sum(dim=1) / lengths[:, None]
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, gpt.config.n_embd)


# one token of a scored text: (token id, its log probability given the tokens before it, the most
# likely tokens there as (id, log probability)); the first token has no logprob and no alternatives
ScoredToken = tuple[int, float | None, list[tuple[int, float]] | None]


@torch.inference_mode()
def prompt_logprobs(gpt: GPT, token_lists: list[list[int]], top: int = 0, rows: int = 256) -> list[list[ScoredToken]]:
    """Every token of each sequence scored by the model: what OpenAI's ``echo`` with ``logprobs``
    returns for the prompt, and how evaluation harnesses score a text (``max_tokens: 0``). The LM
    head runs on ``rows`` positions at a time, so a long text never holds all its logits at once."""
    device = gpt.transformer.wte.weight.device
    scored = []
    for ids in token_lists:
        hidden = gpt.hidden_states(torch.tensor([ids], device=device))[0]
        entries: list[ScoredToken] = [(ids[0], None, None)]
        for start in range(0, len(ids) - 1, rows):     # position p predicts token p + 1
            stop = min(start + rows, len(ids) - 1)
            logp = torch.log_softmax(gpt.lm_head(hidden[start:stop]).float(), dim=-1).cpu()
            targets = torch.tensor(ids[start + 1:stop + 1])
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            best = logp.topk(top, dim=-1) if top else None
            for i, target in enumerate(targets.tolist()):
                alternatives = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else []
                entries.append((target, chosen[i], alternatives))
        scored.append(entries)
    return scored


def pad_right(token_lists: list[list[int]], device: torch.device | str = "cpu",
              pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, longest] batch padded on the right, and each row's real length."""
    if any(len(ids) == 0 for ids in token_lists):
        raise ValueError("cannot classify an empty text; give at least one token")
    lengths = torch.tensor([len(ids) for ids in token_lists])
    idx = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        idx[row, :len(ids)] = torch.tensor(ids)
    return idx.to(device), lengths.to(device)
