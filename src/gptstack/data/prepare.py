"""Corpus -> tokenized shards: ``gptstack prepare``.

Input is any mix of text files, folders of text files and JSONL files (one document per line,
text in a field, ``text`` by default). Each document is tokenized and followed by the end-of-text
token. Output is a folder of flat binary shards (uint16 when the vocabulary fits, else uint32,
read back with ``np.memmap``) plus ``manifest.json`` with token counts, the tokenizer and a SHA-256
of every shard.

Split: with one document (e.g. tinyshakespeare.txt) the text is cut at ``1 - val_fraction`` of
its characters; with several, whole documents are assigned to val by a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..files import fsync_path, write_text_atomic
from ..tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20          # long documents are tokenized in pieces of about this many chars
TEXT_SUFFIXES_SKIPPED = {".bin", ".npy", ".pt", ".safetensors", ".gz", ".zip"}


class DataError(ValueError):
    """The corpus or a prepared dataset is unusable; the message says which file and why."""


@dataclass
class Document:
    source: str
    text: str


def read_documents(inputs: list[str | Path], encoding: str = "utf-8", text_field: str = "text") -> list[Document]:
    """All documents of the inputs, in a stable order (folders are walked sorted)."""
    docs: list[Document] = []
    for entry in inputs:
        path = Path(entry)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)) if path.is_dir() else [path]
        for file in files:
            if file.suffix in TEXT_SUFFIXES_SKIPPED:
                continue
            if file.suffix == ".jsonl":
                docs.extend(_read_jsonl(file, encoding, text_field))
            else:
                docs.append(Document(str(file), _read_text(file, encoding)))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"the corpus {[str(i) for i in inputs]} holds no text: every file is empty or blank")
    return docs


def _read_text(file: Path, encoding: str) -> str:
    raw = file.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"{file} looks binary (it contains NUL bytes); pass text files, folders of them, or JSONL")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not valid {encoding} (bad byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        f"re-encode it (e.g. `iconv -f latin1 -t utf-8`) or pass --encoding with its real encoding") from None
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1") from None


def json_lines(file: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; errors name the line."""
    for number, line in enumerate(_read_text(file, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file} line {number} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{file} line {number} must be a JSON object, got {type(record).__name__}")
        yield number, record


def _read_jsonl(file: Path, encoding: str, text_field: str) -> Iterator[Document]:
    for number, record in json_lines(file, encoding):
        if not isinstance(record.get(text_field), str):
            raise DataError(f"{file} line {number} has no string field {text_field!r}; "
                            f"set --text-field to the field that holds the text")
        yield Document(f"{file}:{number}", record[text_field])


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return [d.text for d in docs], []
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, round(len(docs) * val_fraction))
    val_ids = set(order[:n_val].tolist())
    return ([d.text for i, d in enumerate(docs) if i not in val_ids],
            [d.text for i, d in enumerate(docs) if i in val_ids])


def safe_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces that tokenize to exactly the tokens of the whole.

    A cut is made just before a newline that follows a non-space character: no GPT-2 pre-token
    spans such a place (word, number and punctuation runs stop at whitespace; whitespace runs
    start there), so tokenizing the pieces separately changes nothing.
    """
    chunks, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


class ShardWriter:
    """Appends token arrays to numbered shard files of at most ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            fsync_path(self.out_dir / self.shards[-1]["file"])
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def close(self) -> dict:
        self._close_current()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def prepare(inputs: list[str | Path], out_dir: str | Path, tokenizer: str | dict | Tokenizer = "gpt2",
            val_fraction: float = 0.1, seed: int = 1337, shard_tokens: int = 100_000_000,
            encoding: str = "utf-8", text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize a corpus into train/val shards under ``out_dir``; returns the manifest."""
    tok = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a prepared dataset; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    docs = read_documents(inputs, encoding, text_field)
    train_texts, val_texts = split_documents(docs, val_fraction, seed)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    started = time.time()
    total_chars = sum(len(t) for t in train_texts + val_texts)
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not progress)
    splits = {}
    for split, texts in (("train", train_texts), ("val", val_texts)):
        writer = ShardWriter(out, split, dtype, shard_tokens)
        for text in texts:
            pieces = safe_chunks(text)
            # encode_batch runs on all cores inside the tokenizer's Rust code.
            for start in range(0, len(pieces), 16):
                group = pieces[start:start + 16]
                for ids in tok.encode_batch(group):
                    writer.write(np.asarray(ids, dtype=np.int64))
                bar.update(sum(len(p) for p in group))
            writer.write(np.asarray([tok.eot_id]))
        splits[split] = writer.close()
    bar.close()
    if splits["train"]["tokens"] == 0:
        raise DataError("the training split is empty; lower val_fraction or add text")
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.save(out),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "documents": len(docs),
        "characters": total_chars,
        "inputs": [str(p) for p in inputs],
        "splits": splits,
        "seconds": round(time.time() - started, 3),
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def prepared_location(path: str | Path, cache_dir: str | Path) -> Path:
    """Where ``ensure_prepared`` keeps ``path``'s tokens: the path itself if it is a prepared dataset."""
    source = Path(path)
    if (source / MANIFEST).exists():
        return source
    if not source.exists():
        raise FileNotFoundError(f"data {source} does not exist; pass a dataset made by `gptstack prepare` or a text file/folder")
    return Path(cache_dir) / source.stem


def ensure_prepared(path: str | Path, cache_dir: str | Path, tokenizer: str = "gpt2", progress: bool = True) -> Path:
    """A prepared dataset dir as is; raw text (a file or folder) prepared once into cache_dir/<its name>."""
    target = prepared_location(path, cache_dir)
    if not (target / MANIFEST).exists():
        prepare([Path(path)], target, tokenizer=tokenizer, progress=progress)
    return target
