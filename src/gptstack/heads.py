"""Task heads on top of the GPT's hidden states, and embeddings from them.

``SequenceClassifier``: as in GPT-1's fine-tuning (Radford et al. 2018), a linear layer on the
final hidden state of the last real token of each sequence, after ``clf_pdrop`` dropout. Under
causal attention that token has seen the whole input, and right padding after it changes nothing,
so batches are padded on the right with no attention mask. Every text ends with an end-of-text
token, so the head always reads the same kind of token (GPT-1's "extract" token). ``pooling``
"mean" reads the average of every real token's state instead: each word then reaches the head
directly, not only through what the last state kept of it, which matters when the model was
pretrained on little text like the task's (measured on SST-2 in docs/benchmarks.md).

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
on tweets, not the reading position, is what limits it there. Two options give the head what such a
backbone lacks. ``word_features`` (a number of hash buckets): each word's lexical features (its
lower case, shape, prefixes and suffixes, capitalisation, @ / # / URL flags, and fewer of those for
two words either side: what a classical CRF tagger reads, data/conll.py) are hashed into buckets and
summed by an ``EmbeddingBag`` into a vector beside the hidden state(s). ``crf``: a linear-chain CRF
(crf.py) scores whole tag sequences instead of each word on its own, and decoding is Viterbi over
the whole sentence (its windows joined) with the tag scheme's impossible moves forbidden. Both are
recorded in the head's config, so a checkpoint rebuilds them; their effect on WNUT 2017 is measured
in docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .crf import CRF, scheme_potentials, viterbi
from .data.conll import FEATURES_PER_WORD, NEIGHBOURHOOD, word_features
from .data.records import IGNORE_INDEX
from .loss import linear_cross_entropy
from .model import GPT
from .tokenizer import Tokenizer


def classification_ids(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[int]:
    """The tokens a classifier reads for ``text``: its first ``max_tokens - 1`` tokens and end-of-text."""
    return tokenizer.encode(text)[:max_tokens - 1] + [tokenizer.eot_id]


POOLINGS = ("last", "mean")


def real_tokens(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] True at the real tokens of right-padded rows, row i having ``lengths[i]`` of them."""
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def mean_of_real(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, C]: each row's hidden states [B, T, C] averaged over its real (not padding) tokens."""
    return (hidden * real_tokens(lengths, hidden.shape[1]).unsqueeze(-1)).sum(dim=1) / lengths[:, None]


class SequenceClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str], pooling: str = "last"):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {labels}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.gpt, self.labels, self.pooling = gpt, list(labels), pooling
        self.dropout = nn.Dropout(gpt.config.clf_pdrop)
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, with_lm_loss: bool = False):
        """Logits [B, num_labels] for right-padded ``idx`` [B, T] whose row i has ``lengths[i]`` real
        tokens; ``with_lm_loss``: also the language-modelling loss on the same texts from the same
        forward pass (GPT-1's auxiliary objective during fine-tuning)."""
        hidden = self.gpt.hidden_states(idx)
        if self.pooling == "mean":
            pooled = mean_of_real(hidden, lengths)
        else:
            pooled = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        logits = self.head(self.dropout(pooled))
        if not with_lm_loss:
            return logits
        targets = idx[:, 1:].masked_fill(~real_tokens(lengths, idx.shape[1])[:, 1:], -100)      # padding is not predicted
        return logits, linear_cross_entropy(hidden[:, :-1], self.gpt.lm_head.weight, targets)

    def head_config(self) -> dict:
        """What config.json["head"] records: the kind of head and what it needs to be rebuilt."""
        return {"kind": "classification", "labels": self.labels, "pooling": self.pooling}

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
    """Consecutive words of one text as the tagger reads them: token ids, for each word the
    positions of the states its label is read from (two for ``next``, else one), and the whole
    text's words with the index of this window's first, from which :meth:`features` are hashed."""
    ids: list[int]
    where: list[list[int]]
    words: list[str]
    first: int
    _features: list[list[int]] | None = field(default=None, repr=False, compare=False)

    def features(self) -> list[list[int]]:
        """This window's words' lexical features (hashes from :func:`~gptstack.data.conll.word_features`,
        neighbours in other windows included). Computed when a head with word features first reads the
        window, not when it is cut: a head without them (and every /v1/ner call to one) never pays;
        then kept, so a training window is hashed once, not at every step."""
        if self._features is None:
            reach = max(abs(offset) for offset, _ in NEIGHBOURHOOD)
            start = max(self.first - reach, 0)
            rows = word_features(self.words[start:self.first + len(self.where) + reach])
            self._features = rows[self.first - start:self.first - start + len(self.where)]
        return self._features


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
        ids, where = _window(pieces[start:end], context, eot)
        windows.append(TaggingWindow(ids, where, words, start))
        start = end
    return windows


def _window(pieces: list[list[int]], context: str, eot: int) -> tuple[list[int], list[list[int]]]:
    flat = [p for word in pieces for p in word]
    ends = list(itertools.accumulate(len(w) for w in pieces))   # one past each word's last piece, in flat
    if context == "echo":
        return [eot, *flat, eot, *flat], [[len(flat) + 1 + e] for e in ends]
    if context == "first":
        return [eot, *flat], [[1 + e - len(w)] for e, w in zip(ends, pieces)]
    if context == "last":
        return [eot, *flat], [[e] for e in ends]
    return [eot, *flat, eot], [[e, e + 1] for e in ends]


# a word's hashed lexical features are summed into a vector of this size beside its hidden state(s)
WORD_FEATURE_DIM = 64
# one tagged sentence: its tag ids, and how sure the tagger is of each (the tag's probability under
# a softmax head, its marginal probability under a CRF)
Tagged = tuple[list[int], torch.Tensor]


class TokenClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str], context: str, word_features: int = 0, crf: bool = False):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a token classifier needs at least two labels, got {labels}")
        if context not in TOKEN_CONTEXTS:
            raise ValueError(f"context must be one of {TOKEN_CONTEXTS}, got {context!r}")
        if word_features < 0:
            raise ValueError(f"word_features is a number of hash buckets (0: none), got {word_features}")
        self.gpt, self.labels, self.context = gpt, list(labels), context
        self.word_features = word_features
        self.dropout = nn.Dropout(gpt.config.clf_pdrop)
        self.bag = nn.EmbeddingBag(word_features, WORD_FEATURE_DIM, mode="sum") if word_features else None
        if self.bag is not None:
            nn.init.normal_(self.bag.weight, std=0.02)
        width = gpt.config.n_embd * (2 if context == "next" else 1) + (WORD_FEATURE_DIM if word_features else 0)
        self.head = nn.Linear(width, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.crf = CRF(self.labels) if crf else None

    def forward(self, sentences: list[list[TaggingWindow]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Label scores [S, L, num_labels] of each sentence's words, its windows (:func:`tagging_windows`)
        joined, with the mask [S, L] of real words."""
        windows = [w for windows in sentences for w in windows]
        idx, where, features, counts = pad_windows(windows, self.head.weight.device, with_features=self.bag is not None)
        x = self.hidden(idx, where)
        if self.bag is not None:
            bags = self.bag((features % self.word_features).flatten(0, 1)).view(*where.shape[:2], -1)
            x = torch.cat([x, bags.to(x.dtype)], dim=-1)
        logits = self.head(self.dropout(x)).float()
        words = torch.cat([row[:n] for row, n in zip(logits, counts)])
        lengths = [sum(len(w.where) for w in windows) for windows in sentences]
        scores = nn.utils.rnn.pad_sequence(list(words.split(lengths)), batch_first=True)
        mask = torch.arange(scores.shape[1], device=scores.device) < torch.tensor(lengths, device=scores.device)[:, None]
        return scores, mask

    def loss(self, scores: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
             class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """The mean loss per word of :meth:`forward`'s ``scores`` and ``mask`` against ``targets`` [S, L]
        (IGNORE_INDEX past each sentence's end): the CRF's negative log-likelihood of each whole
        sequence, or cross-entropy (optionally class-weighted and smoothed) word by word."""
        if self.crf is not None:
            return self.crf.nll(scores, targets, mask).sum() / mask.sum()
        return nn.functional.cross_entropy(scores.flatten(0, 1), targets.flatten(), weight=class_weights,
                                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)

    def hidden(self, idx: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The GPT's states the head reads for each word: [B, W, k * n_embd], those at ``where`` side by side."""
        hidden = self.gpt.hidden_states(idx)
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
        return hidden[rows, where].flatten(2)

    def decode(self, scores: torch.Tensor, mask: torch.Tensor) -> list[Tagged]:
        """Each sentence's tags: the CRF's most likely sequence, or the likeliest under the softmax that
        the tag scheme allows (both by Viterbi: a well-formed sequence, measured better than each
        word's own most likely tag on WNUT 2017)."""
        if self.crf is not None:
            paths, probs = self.crf.viterbi(scores, mask), self.crf.marginals(scores, mask).cpu()
        else:
            logp = torch.log_softmax(scores, dim=-1)
            paths, probs = viterbi(logp, mask, *scheme_potentials(self.labels, logp.device)), logp.exp().cpu()
        return [(path, row[torch.arange(len(path)), path]) for path, row in zip(paths, probs)]

    @torch.inference_mode()
    def tag(self, sentences: list[list[TaggingWindow]], batch_size: int = 32) -> list[Tagged]:
        """The tags of each sentence (given as its windows, :func:`tagging_windows`)."""
        self.eval()
        out = []
        for start in range(0, len(sentences), batch_size):
            out += self.decode(*self(sentences[start:start + batch_size]))
        return out

    def head_config(self) -> dict:
        return {"kind": "token_classification", "labels": self.labels, "context": self.context,
                "word_features": self.word_features, "crf": self.crf is not None}

    def _parts(self) -> dict[str, nn.Module]:
        """The head's modules by the prefix of their weights' names in a checkpoint."""
        parts = {"token_classifier.": self.head, "token_classifier.bag.": self.bag, "token_classifier.crf.": self.crf}
        return {prefix: module for prefix, module in parts.items() if module is not None}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {prefix + k: v for prefix, module in self._parts().items() for k, v in module.state_dict().items()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in self._parts().items():
            module.load_state_dict({k: state[prefix + k] for k in module.state_dict() if prefix + k in state})


def pad_windows(windows: list[TaggingWindow], device: torch.device | str = "cpu", with_features: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
    """Right-padded ids [B, T], read positions [B, W, k], ``with_features`` the word features
    [B, W, FEATURES_PER_WORD] (else None), padding words reading position 0 and feature 0, and
    each window's number of words."""
    idx, _ = pad_right([w.ids for w in windows], device)
    counts = [len(w.where) for w in windows]
    where = torch.zeros(len(windows), max(counts), len(windows[0].where[0]), dtype=torch.long)
    for row, window in enumerate(windows):
        where[row, :len(window.where)] = torch.tensor(window.where)
    if not with_features:
        return idx, where.to(device), None, counts
    features = torch.zeros(len(windows), max(counts), FEATURES_PER_WORD, dtype=torch.long)
    for row, window in enumerate(windows):
        features[row, :len(window.where)] = torch.tensor(window.features())
    return idx, where.to(device), features.to(device), counts


@torch.inference_mode()
def mean_pooled_embeddings(gpt: GPT, token_lists: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """[N, n_embd] fp32 embeddings: each sequence's final hidden states averaged over its tokens, then
    scaled to unit length (so a dot product is the cosine similarity). Sequences are right-padded
    in batches; under causal attention the padding changes no real token's state."""
    out = []
    for start in range(0, len(token_lists), batch_size):
        idx, lengths = pad_right(token_lists[start:start + batch_size], gpt.transformer.wte.weight.device)
        pooled = mean_of_real(gpt.hidden_states(idx).float(), lengths)
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
