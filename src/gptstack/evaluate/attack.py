"""How much of a text classifier's accuracy survives small edits: `gptstack eval --attack ...`.

The search is greedy by word importance, as in DeepWordBug (Gao et al. 2018) and TextFooler
(Jin et al. 2020). A word's importance is how much deleting it lowers the probability of the true
class; the most important words are then changed first, each to the candidate that lowers that
probability most, until the prediction flips or the budget of changed words is spent. Candidates
are DeepWordBug's character edits (swap two adjacent letters, substitute, delete or insert one)
and/or synonyms from the list shipped in assets/synonyms/. All candidates of a step are scored in
one batch; the search is seeded, so an attack is repeatable. Every adversarial text is scored once
more on its own at the end, and only that score decides whether the attack succeeded.
``perturb`` makes the same moves at random words without the search: fine-tuning's ``augment``
trains on them.

The search is written here rather than taken from TextAttack (0.3.11): its character-level recipe
would run offline, but the package requires transformers, datasets, flair, bert-score,
language_tool_python and more as dependencies, its word-embedding and WordNet recipes download
their data at run time, and the greedy search itself is a few dozen lines.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..heads import SequenceClassifier, classification_ids
from ..tokenizer import Tokenizer

ATTACKS = ("none", "deepwordbug", "synonym", "both")
SYNONYMS = Path(__file__).resolve().parents[1] / "assets" / "synonyms" / "sentiment.txt"


@functools.cache
def synonym_table(path: Path = SYNONYMS) -> dict[str, list[str]]:
    """Each listed word and the other words of the group(s) it is in (the file holds one group a line)."""
    table: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        group = [] if line.startswith("#") else line.split()
        for word in group:
            known = table.setdefault(word, [])
            known += [other for other in group if other != word and other not in known]
    return table


def character_edits(word: str, rng: random.Random, limit: int) -> list[str]:
    """Up to ``limit`` of DeepWordBug's edits of ``word``, a seeded draw of equal shares of its four
    kinds: adjacent swaps, substitutions, deletions and insertions of a lower-case letter."""
    letters = string.ascii_lowercase
    kinds = [[word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)],
             [word[:i] + c + word[i + 1:] for i in range(len(word)) for c in letters],
             [word[:i] + word[i + 1:] for i in range(len(word))] if len(word) > 1 else [],
             [word[:i] + c + word[i:] for i in range(len(word) + 1) for c in letters]]
    share = max(1, limit // len(kinds))
    edits = [e for kind in kinds for e in rng.sample(kind, min(share, len(kind)))]
    return list(dict.fromkeys(e for e in edits if e != word))[:limit]


def synonyms(word: str) -> list[str]:
    """The listed synonyms of ``word``, capitalised as it is."""
    found = synonym_table().get(word.lower(), [])
    return [s.capitalize() for s in found] if word[:1].isupper() else found


def replacements(word: str, kind: str, rng: random.Random, limit: int) -> list[str]:
    """The words the attack of ``kind`` may put in place of ``word``: its listed synonyms and/or up
    to ``limit`` character edits."""
    edits = character_edits(word, rng, limit) if kind in ("deepwordbug", "both") else []
    listed = synonyms(word) if kind in ("synonym", "both") else []
    return list(dict.fromkeys(listed + edits))


def perturb(text: str, kind: str, share: float, rng: random.Random) -> str:
    """``text`` with ``ceil(share * words)`` (at least one) of the words the attack could change, drawn
    at random, each changed to a random one of its replacements: the attack's moves without its search,
    to train on. Words are counted as the attack counts them (whitespace-separated, punctuation too);
    a text with no word the attack could change comes back as it is."""
    parts = re.findall(r"\S+|\s+", text)
    editable = kind in ("deepwordbug", "both")      # every word with a letter has character edits
    targets = [i for i, part in enumerate(parts)
               if any(c.isalpha() for c in part) and (editable or synonyms(part))]
    count = min(len(targets), max(1, math.ceil(share * sum(not part.isspace() for part in parts))))
    changes = {}
    for i in rng.sample(targets, count):
        changes[i] = rng.choice(replacements(parts[i], kind, rng, limit=4))     # an edit of each kind to draw from
    return render(parts, changes)


@dataclass
class AttackedText:
    text: str
    adversarial: str
    label: int
    clean_prediction: int
    prediction: int        # of the adversarial text, scored on its own after the search
    words: int
    changed: int
    queries: int           # texts the model scored for this one


class Attack:
    """A greedy word-importance attack on ``classifier`` (see the module's docstring). ``kind``
    picks the candidates (one of ATTACKS but "none"); at most ``ceil(budget * words)`` words of
    a text are changed, and at least one; ``candidates`` bounds the character edits tried per word."""

    def __init__(self, classifier: SequenceClassifier, tokenizer: Tokenizer, kind: str, budget: float,
                 candidates: int = 20, seed: int = 0, batch_size: int = 64):
        if kind not in ATTACKS[1:]:
            raise ValueError(f"attack must be one of {ATTACKS[1:]}, got {kind!r}")
        self.classifier, self.tokenizer, self.kind = classifier, tokenizer, kind
        self.budget, self.candidates, self.seed, self.batch_size = budget, candidates, seed, batch_size

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        block = self.classifier.gpt.config.block_size
        ids = [classification_ids(self.tokenizer, text, block) for text in texts]
        return self.classifier.predict(ids, self.batch_size).float()

    def run(self, texts: list[str], labels: list[int], progress: bool = False) -> list[AttackedText]:
        clean = self.probabilities(texts).argmax(-1).tolist()
        rows = tqdm(list(enumerate(zip(texts, labels, clean))), desc="attacking", unit="text", disable=not progress)
        # a text classified wrong is left as it is (scored once)
        searched = [self.search(text, label, i) if prediction == label else (text, 0, 1)
                    for i, (text, label, prediction) in rows]
        # the changed texts scored again on their own; an unchanged one keeps its clean prediction
        changed = [i for i, (_, count, _) in enumerate(searched) if count]
        final = list(clean)
        for i, prediction in zip(changed, self.probabilities([searched[i][0] for i in changed]).argmax(-1).tolist()):
            final[i] = prediction
        return [AttackedText(text, adversarial, label, before, after, len(text.split()), changed, queries)
                for text, label, before, after, (adversarial, changed, queries) in zip(texts, labels, clean, final, searched)]

    def search(self, text: str, label: int, index: int) -> tuple[str, int, int]:
        """(adversarial text, words changed, texts scored) for a text the classifier gets right."""
        rng = random.Random(f"{self.seed}:{index}")
        parts = re.findall(r"\S+|\s+", text)     # words and the spaces between: joined, they are the text
        words = [i for i, part in enumerate(parts) if not part.isspace()]
        budget = max(1, math.ceil(self.budget * len(words)))
        targets = [i for i in words if any(c.isalpha() for c in parts[i])]
        if not targets:
            return text, 0, 0
        scores = self.probabilities([text] + [render(parts, deletion(parts, i)) for i in targets])[:, label]
        queries = len(targets) + 1
        order = sorted(range(len(targets)), key=lambda k: scores[k + 1].item())   # most important first
        changes, best = {}, scores[0].item()
        for k in order:
            if len(changes) == budget:
                break
            i = targets[k]
            options = replacements(parts[i], self.kind, rng, self.candidates)
            if not options:
                continue
            probs = self.probabilities([render(parts, {**changes, i: option}) for option in options])
            queries += len(options)
            pick = int(probs[:, label].argmin())
            if probs[pick, label].item() >= best:
                continue
            changes[i], best = options[pick], probs[pick, label].item()
            if probs[pick].argmax().item() != label:
                break
        return render(parts, changes), len(changes), queries


def deletion(parts: list[str], i: int) -> dict[int, str]:
    """The replacements that delete word ``i`` and one space beside it."""
    space = i - 1 if i > 0 and parts[i - 1].isspace() else i + 1
    return {i: "", space: ""}


def render(parts: list[str], changes: dict[int, str]) -> str:
    return "".join(changes.get(i, part) for i, part in enumerate(parts))


def attack_summary(attacked: list[AttackedText]) -> dict:
    """Clean accuracy, accuracy under attack, success rate (flipped among texts first classified
    right), mean share of words changed (over successful attacks) and texts scored per attacked text."""
    correct = [a for a in attacked if a.clean_prediction == a.label]
    flipped = [a for a in correct if a.prediction != a.label]
    return {"clean_accuracy": len(correct) / len(attacked),
            "attacked_accuracy": sum(a.prediction == a.label for a in attacked) / len(attacked),
            "attack_success_rate": len(flipped) / len(correct) if correct else 0.0,
            "words_changed": sum(a.changed / a.words for a in flipped) / len(flipped) if flipped else 0.0,
            "queries": sum(a.queries for a in correct) / len(correct) if correct else 0.0}


def write_attacked(attacked: list[AttackedText], labels: list[str], path: str | Path) -> Path:
    """The attacked texts as JSONL, labels by name, for reading what the attack did."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for a in attacked:
            row = asdict(a)
            for key in ("label", "clean_prediction", "prediction"):
                row[key] = labels[row[key]]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
