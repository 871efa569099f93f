"""Tagged sentences for token classification (named-entity recognition): reading, tag schemes, spans.

Two file formats, one record shape ``{"tokens": [...], "tags": [...]}``:

* CoNLL (any suffix but .jsonl): one ``token tag`` per line, whitespace-separated (with more
  columns, as CoNLL-2003 has, the first is the token and the last the tag); a line that is empty
  or holds only whitespace ends a sentence (WNUT 2017's training file ends most sentences at a line
  holding a single tab); ``-DOCSTART-`` lines are skipped.
* JSONL: one ``{"tokens": [...], "tags": [...]}`` object per line (what fine-tuning writes to
  ``splits/``).

Tags are ``O`` or ``B-``/``I-`` (BIO) or also ``E-``/``S-`` (BIOES) followed by a type. A tag of
another shape is an error naming the file and line. An ill-formed sequence (an ``I-PER`` after
``O`` or after ``B-LOC``, a BIOES entity without its ``E-``) is repaired, with one warning per
file: it is read the way conlleval and seqeval's default mode read it (an ``I-`` that does not
continue an entity of its type starts one) and written back well-formed in the file's scheme. So
training, evaluation and the server all see one reading of every sequence, and it is the one the
published WNUT scores were computed with.

``word_descriptions`` describes each word as a classical CRF tagger does (lower case, shape, affixes,
capitalisation and @ / # / URL flags, its own and its neighbours'); ``word_features`` gives the
same as hashes a tagger's head can look up: a small backbone that knows little of the task's text
gains most from these.
"""

from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path

from .prepare import DataError, json_lines

log = logging.getLogger("gptstack.data")

SCHEMES = ("bio", "bioes")
TAG = re.compile(r"^(?:O|[BIES]-\S+)$")
# The words a served text is cut into, close to how tweets are tokenized in WNUT 2017: URLs,
# @mentions and #hashtags whole, words with inner apostrophes or hyphens whole, every other
# punctuation mark alone.
WORD = re.compile(r"https?://\S+|www\.\S+|[@#]\w+|\w+(?:['’\-]\w+)*|[^\w\s]")

Span = tuple[str, int, int]   # (type, first word, one past the last word)


def read_tagged(path: str | Path) -> list[dict]:
    """Sentences of a CoNLL or JSONL file as ``{"tokens", "tags"}`` records, tags repaired if
    ill-formed (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tagged data {path} does not exist (or is not a file)")
    if path.suffix.lower() == ".jsonl":
        sentences = _jsonl_sentences(path)
    else:
        try:
            sentences = _conll_sentences(path.read_text(encoding="utf-8-sig"), path)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not sentences:
        raise DataError(f"{path} holds no tagged sentences")
    scheme = scheme_of(tag for _, tags, _ in sentences for tag in tags)
    records, repaired = [], []
    for tokens, tags, line in sentences:
        fixed = tags_from_spans(entity_spans(tags), len(tags), scheme)
        if fixed != tags:
            repaired.append(line)
        records.append({"tokens": tokens, "tags": fixed})
    if repaired:
        log.warning("%s: %d of %d sentences had ill-formed %s tag sequences (the first at line %d); read as "
                    "conlleval reads them: an I-/E- tag that does not continue an entity of its type starts one",
                    path, len(repaired), len(records), scheme.upper(), repaired[0])
    return records


def _conll_sentences(text: str, path: Path) -> list[tuple[list[str], list[str], int]]:
    """(tokens, tags, first line number) of each sentence."""
    sentences, tokens, tags, start = [], [], [], 0
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.replace("\ufeff", "").split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags, start))
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: expected a token and a tag separated by whitespace, got {line!r}")
        _check_tag(fields[-1], path, number)
        start = start if tokens else number
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        sentences.append((tokens, tags, start))
    return sentences


def _jsonl_sentences(path: Path) -> list[tuple[list[str], list[str], int]]:
    sentences = []
    for number, record in json_lines(path):     # bad JSON, or not an object: an error naming the line
        if not {"tokens", "tags"} <= record.keys():
            raise DataError(f'{path}:{number}: expected an object with "tokens" and "tags" lists')
        tokens, tags = record["tokens"], record["tags"]
        if not (isinstance(tokens, list) and isinstance(tags, list) and tokens and len(tokens) == len(tags)):
            raise DataError(f'{path}:{number}: "tokens" and "tags" must be non-empty lists of the same length')
        if not all(isinstance(t, str) and t.strip() for t in tokens):
            raise DataError(f'{path}:{number}: every token must be a non-empty string')
        for tag in tags:
            _check_tag(tag, path, number)
        sentences.append((tokens, tags, number))
    return sentences


def _check_tag(tag: object, path: Path, number: int) -> None:
    if not isinstance(tag, str) or not TAG.match(tag):
        raise DataError(f"{path}:{number}: tag {tag!r} is neither O nor B-/I-/E-/S- followed by a type "
                        "(BIO or BIOES)")


def scheme_of(tags) -> str:
    """``bioes`` when any tag starts with E- or S-, else ``bio``."""
    return "bioes" if any(tag[:2] in ("E-", "S-") for tag in tags) else "bio"


def entity_spans(tags: list[str]) -> list[Span]:
    """The entities of a tag sequence as (type, start, end) word spans, end exclusive, read as
    conlleval and seqeval's default mode read them: a chunk ends before a B-/S-/O, after an E-/S-,
    or where the type changes; an I-/E- that does not continue its type's chunk starts one."""
    spans, start = [], 0
    prev_tag, prev_type = "O", ""
    for i, tag in enumerate([*tags, "O"]):
        kind, kind_type = tag[0], tag[2:]
        ends = (prev_tag in "ES" or (prev_tag in "BI" and kind in "BSO")
                or (prev_tag != "O" and prev_type != kind_type))
        if ends:
            spans.append((prev_type, start, i))
        starts = (kind in "BS" or (prev_tag in "ESO" and kind in "IE")
                  or (kind != "O" and prev_type != kind_type))
        if starts:
            start = i
        prev_tag, prev_type = kind, kind_type
    return spans


def tags_from_spans(spans: list[Span], length: int, scheme: str) -> list[str]:
    """A well-formed tag sequence of ``length`` words in ``scheme`` marking ``spans``."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    tags = ["O"] * length
    for kind, start, end in spans:
        tags[start:end] = [f"B-{kind}"] + [f"I-{kind}"] * (end - start - 1)
        if scheme == "bioes":
            tags[end - 1] = f"E-{kind}" if end - start > 1 else f"S-{kind}"
    return tags


def shape(word: str) -> str:
    """Xxxx-style shape with runs collapsed: "iPhone7" -> "xXxd"."""
    return re.sub(r"(.)\1+", r"\1", re.sub(r"[A-Z]", "X", re.sub(r"[a-z]", "x", re.sub(r"\d", "d", word))))


def describe_word(word: str) -> dict[str, str]:
    """The lexical features a classical NER tagger reads from a word on its own, by name."""
    lower = word.lower()
    flags = {"title": word.istitle(), "upper": word.isupper(), "digit": any(c.isdigit() for c in word),
             "mention": word.startswith("@"), "hashtag": word.startswith("#"),
             "url": lower.startswith(("http", "www.")), "alpha": word.isalpha()}
    return {"lower": lower, "shape": shape(word), "flags": ",".join(k for k, on in flags.items() if on),
            **{f"prefix{n}": lower[:n] for n in (1, 2, 3)}, **{f"suffix{n}": lower[-n:] for n in (1, 2, 3)}}


# which features of which neighbour describe a word: all of its own, fewer the further away
NEIGHBOURHOOD = ((0, ("lower", "shape", "flags", "prefix1", "prefix2", "prefix3", "suffix1", "suffix2", "suffix3")),
                 (-1, ("lower", "shape", "flags", "prefix3", "suffix3")), (1, ("lower", "shape", "flags", "prefix3", "suffix3")),
                 (-2, ("lower", "shape", "flags")), (2, ("lower", "shape", "flags")))
FEATURES_PER_WORD = sum(len(names) for _, names in NEIGHBOURHOOD)


def word_descriptions(words: list[str]) -> list[dict[str, str]]:
    """Each word's FEATURES_PER_WORD lexical features (NEIGHBOURHOOD) as {"offset:name": value}; a
    neighbour beyond the sentence's edge has the value "<edge>". One description for the tagger's
    hashed features and the classical CRF baseline (bench/ner_baseline.py), so both read the same."""
    described, edge = [describe_word(w) for w in words], dict.fromkeys(describe_word(""), "<edge>")
    rows = []
    for i in range(len(words)):
        row = {}
        for offset, names in NEIGHBOURHOOD:
            seen = described[i + offset] if 0 <= i + offset < len(words) else edge
            row.update({f"{offset}:{name}": seen[name] for name in names})
        rows.append(row)
    return rows


def word_features(words: list[str]) -> list[list[int]]:
    """:func:`word_descriptions` as 32-bit hashes of "offset:name=value", for a tagger's head to look up
    (CRC-32: the same in every process, unlike Python's ``hash``)."""
    return [[zlib.crc32(f"{key}={value}".encode()) for key, value in row.items()] for row in word_descriptions(words)]


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``text`` cut into words (see WORD), each with its character offsets [start, end)."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]
