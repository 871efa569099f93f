"""Task data for fine-tuning and evaluation: labelled texts, prompt/response pairs and chats.

Records come from TSV, CSV (a header row names the columns) or JSONL (one object per line). For
supervised fine-tuning (SFT) each example becomes token ids plus a mask of the tokens the model
should learn to produce (the response and its end-of-text); examples are then packed whole into
fixed-length windows, so batches have one static shape and little padding.
"""

from __future__ import annotations

import bisect
import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..chat import chat_segments
from ..tokenizer import Tokenizer
from .pii import Scrubber, scrub_strings
from .prepare import DataError, json_lines

IGNORE_INDEX = -100       # targets the loss skips (prompt tokens, padding)
TEXT_FIELDS = ("text", "sentence", "input", "document")


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .tsv / .csv / .jsonl file as dicts; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_MINIMAL)
            records = list(reader)
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty; it needs a header row naming its columns")
        for line, record in enumerate(records, start=2):
            if None in record or any(v is None for v in record.values()):
                raise DataError(f"{path}:{line} does not have one value per column of the header {reader.fieldnames}")
        return records
    if suffix in (".jsonl", ".json"):
        return [record for _, record in json_lines(path)]
    raise DataError(f"{path}: unknown file type {suffix!r}; use .tsv, .csv or .jsonl")


def scrubbed(records: list[dict], scrubber: Scrubber, keep: tuple[str, ...]) -> tuple[list[dict], Counter]:
    """The records with personal and secret data replaced in every string except the fields in
    ``keep`` (labels, tags), and how many of each type were replaced."""
    counts: Counter = Counter()
    return [scrub_strings(record, scrubber, counts, frozenset(keep)) for record in records], counts


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle cut into (train, val)."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and (n_val == 0 or n_val == len(records)):
        raise DataError(f"{len(records)} records cannot be split with val_fraction {val_fraction}; "
                        "add records or give a separate eval_data file")
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# --- classification -----------------------------------------------------------------------------

@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]


def labelled_texts(records: list[dict], source: str, text_field: str = "", label_field: str = "label",
                   need_labels: bool = True) -> LabelledTexts:
    """Texts and string labels from records; ``text_field`` "" picks the first of TEXT_FIELDS present."""
    if not records:
        raise DataError(f"{source} holds no records")
    columns = set(records[0])
    field = text_field or next((f for f in TEXT_FIELDS if f in columns), "")
    if field not in columns:
        raise DataError(f"{source} has no text column {text_field or TEXT_FIELDS}; its columns are "
                        f"{sorted(columns)}: pass text_field")
    if need_labels and label_field not in columns:
        raise DataError(f"{source} has no label column {label_field!r}; its columns are {sorted(columns)}: pass label_field")
    texts, labels = [], []
    for i, record in enumerate(records):
        text = record.get(field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}: record {i + 1} has no text in {field!r}")
        texts.append(text.strip())
        if need_labels:
            if record.get(label_field) in (None, ""):
                raise DataError(f"{source}: record {i + 1} has no label in {label_field!r}")
            labels.append(str(record[label_field]).strip())
    return LabelledTexts(texts, labels)


def label_order(labels: list[str]) -> list[str]:
    """The distinct labels, numerically sorted when they are all integers ("0", "1", ...)."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


# --- supervised fine-tuning (prompt -> response) ---------------------------------------------------

def sft_segments(record: dict, source: str, index: int) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of one SFT record: {"prompt", "response"} or {"messages": [...]}."""
    if "messages" in record:
        try:
            return chat_segments(record["messages"], record.get("tools"))
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            raise DataError(f"{source}: record {index + 1}: {exc}") from None
    prompt, response = record.get("prompt"), record.get("response", record.get("completion"))
    if not isinstance(prompt, str) or not isinstance(response, str) or not response:
        raise DataError(f"{source}: record {index + 1} needs string fields 'prompt' and 'response' "
                        f"(or 'messages'); it has {sorted(record)}")
    return [(prompt, False), (response, True)]


def encode_sft(records: list[dict], tokenizer: Tokenizer, source: str) -> list[tuple[list[int], list[bool]]]:
    """Token ids and a per-token "learn this" mask for each record, ending with end-of-text."""
    examples = []
    for i, record in enumerate(records):
        ids, mask = [], []
        for text, is_response in sft_segments(record, source, i):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [is_response] * len(piece)
        examples.append((ids + [tokenizer.eot_id], mask + [True]))
    return examples


def pack_windows(examples: list[tuple[list[int], list[bool]]], block_size: int,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack whole examples into windows of block_size + 1 tokens (best fit, longest first); an
    example is never split between windows.

    Returns inputs [N, block_size], targets [N, block_size] (IGNORE_INDEX except where the next
    token is a response token), documents [N, block_size] (which example of its window each input
    token belongs to, the padding being one more: the model's ``documents``, so that examples
    packed together never attend to each other) and how many examples were cut to fit (their
    prompt's start is dropped).
    """
    width = block_size + 1
    truncated = 0
    fitted = []
    for ids, mask in examples:
        if len(ids) > width:
            ids, mask, truncated = ids[-width:], mask[-width:], truncated + 1
        fitted.append((ids, mask))
    windows: list[list[tuple[list[int], list[bool]]]] = []
    rooms: list[tuple[int, int]] = []          # (free tokens, window) of windows with room, sorted
    for ids, mask in sorted(fitted, key=lambda e: -len(e[0])):
        at = bisect.bisect_left(rooms, (len(ids), -1))    # the fullest window it still fits in
        if at == len(rooms):
            windows.append([])
            free, window = width, len(windows) - 1
        else:
            free, window = rooms.pop(at)
        windows[window].append((ids, mask))
        if free - len(ids) > 0:
            bisect.insort(rooms, (free - len(ids), window))
    tokens = torch.full((len(windows), width), pad_id, dtype=torch.long)
    learn = torch.zeros((len(windows), width), dtype=torch.bool)
    documents = torch.zeros((len(windows), width), dtype=torch.long)
    for w, members in enumerate(windows):
        ids = [t for member_ids, _ in members for t in member_ids]
        mask = [m for _, member_mask in members for m in member_mask]
        tokens[w, :len(ids)] = torch.tensor(ids)
        learn[w, :len(mask)] = torch.tensor(mask)
        documents[w] = len(members)      # the padding after the last example
        documents[w, :len(ids)] = torch.repeat_interleave(torch.arange(len(members)),
                                                          torch.tensor([len(i) for i, _ in members]))
    targets = tokens[:, 1:].masked_fill(~learn[:, 1:], IGNORE_INDEX)
    return tokens[:, :-1].contiguous(), targets.contiguous(), documents[:, :-1].contiguous(), truncated
