"""Corpus -> tokenized shards: ``gptstack prepare``.

Input is any mix of text files, folders of text files and JSONL files (one document per line,
text in a field, ``text`` by default). Each document is tokenized and followed by the end-of-text
token. Output is a folder of flat binary shards (uint16 when the vocabulary fits, else uint32,
read back with ``np.memmap``) plus ``manifest.json`` with token counts, the tokenizer and a SHA-256
of every shard.

Built for corpora larger than memory:
- Files are read in blocks and cut into pieces where a cut cannot change the tokens
  (``safe_pieces``); a few batches of pieces are in flight at a time and shards are written as
  they fill, so memory does not grow with the corpus, except that a line with no safe cut point is
  held whole.
- A pool of worker processes tokenizes the pieces. The pieces do not depend on the number of
  workers, so neither do the bytes written.
- A first pass reads everything once: it reports a bad file before any tokenizing and counts the
  documents, which the split needs.
- After each finished shard, ``progress.json`` records the shards so far with their checksums and
  where in the input the run stands. The same command run again after a crash goes on from there
  and writes exactly what an uninterrupted run writes; other input or options are refused. A lock
  on ``.lock`` in the output folder keeps a second run from writing there at the same time.

Split: with one document (e.g. tinyshakespeare.txt) the text is cut at ``1 - val_fraction`` of
its characters; with several, ``max(1, round(n * val_fraction))`` whole documents go to val, drawn
by seeded selection sampling (each document in turn with probability still-needed / still-left),
which needs no list of the documents in memory.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from ..config import pii_settings
from ..files import sha256_file, write_text_atomic
from ..tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from .pii import KEY_FILE, Scrubber, run_key

MANIFEST = "manifest.json"
PII_REPORT = "pii_report.json"  # with --scrub-pii: what was replaced, per file and type (never the values)
PROGRESS = "progress.json"     # the manifest in progress: what a killed run needs to go on
LOCK = ".lock"                 # held by the run writing the folder
FORMAT_VERSION = 1
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 18          # text is read, cut and tokenized in pieces of about this many chars
BINARY_PROBE = 65536           # a NUL byte this close to the start of a file means it is not text
SAFE_CUT = re.compile(r"(?<=\S)\r?\n")
TEXT_SUFFIXES_SKIPPED = {".bin", ".npy", ".pt", ".safetensors", ".gz", ".zip"}


class DataError(ValueError):
    """The corpus or a prepared dataset is unusable; the message says which file and why."""


# --- reading ------------------------------------------------------------------------------------

def corpus_files(inputs: list[str | Path], out: Path | None = None) -> Iterator[Path]:
    """The input files in a stable order: folders walked with their entries sorted by name (the
    order of ``sorted(rglob)``). Skipped: hidden entries, binary formats, links to folders (rglob
    did not follow them either; links to files are read) and the output folder ``out``, which may
    lie inside an input folder and must not be read back as text."""
    skip = out.resolve() if out else None
    for entry in inputs:
        path = Path(entry)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        for file in _walk(path, skip) if path.is_dir() else [path]:
            if file.suffix not in TEXT_SUFFIXES_SKIPPED:
                yield file


def _walk(directory: Path, skip: Path | None) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list the folder {directory}: {exc.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            if Path(entry.path).resolve() != skip:
                yield from _walk(Path(entry.path), skip)
        elif entry.is_file():
            yield Path(entry.path)


class TextReader:
    """A file's text as decoded blocks. It remembers where the blocks began, so that ``offset`` can
    say how a later run gets back to any character not yet passed."""

    def __init__(self, path: Path, encoding: str, byte: int = 0, decoder: list | None = None, skip: int = 0,
                 on_read: Callable[[int], object] | None = None):
        try:
            self._decoder = codecs.getincrementaldecoder(encoding)()
        except LookupError:
            raise DataError(f"unknown text encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1") from None
        if decoder:
            self._decoder.setstate((bytes.fromhex(decoder[0]), decoder[1]))
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        self._file.seek(byte)
        self.path, self.encoding, self._on_read = path, encoding, on_read
        self._byte, self._decoded, self._held = byte, -skip, ""
        self._marks = deque([(-skip, byte, self._decoder.getstate())])   # (char, byte, decoder state) of block starts

    def __enter__(self) -> TextReader:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def blocks(self, limit: int | None = None) -> Iterator[str]:
        """The text from here on, at most ``limit`` characters of it; the rest stays for the next call."""
        left = limit
        while left is None or left > 0:
            text, self._held = self._held or self._read_block(), ""
            if text is None:
                return
            if left is not None:
                text, self._held = text[:left], text[left:]
                left -= len(text)
            yield text

    def offset(self, char: int) -> dict:
        """How to come back to character ``char`` (counted from where this reader started): decode
        from ``byte`` with the decoder in state ``decoder``, dropping ``skip`` characters."""
        while len(self._marks) > 1 and self._marks[1][0] <= char:
            self._marks.popleft()
        start, byte, (pending, flag) = self._marks[0]
        return {"byte": byte, "decoder": [pending.hex(), flag], "skip": char - start}

    def _read_block(self) -> str | None:
        """The next non-empty decoded block; None at the end of the file."""
        while True:
            state, at = self._decoder.getstate(), self._byte
            raw = self._file.read(CHUNK_CHARS)
            if at == 0 and b"\x00" in raw[:BINARY_PROBE]:
                raise DataError(f"{self.path} looks binary (it contains NUL bytes); pass text files, folders of them, or JSONL")
            self._byte += len(raw)
            if self._on_read:
                self._on_read(len(raw))
            try:
                text = self._decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise DataError(f"{self.path} is not valid {self.encoding} (bad byte 0x{exc.object[exc.start]:02x} at offset "
                                f"{at - len(state[0]) + exc.start}); re-encode it (e.g. `iconv -f latin1 -t utf-8`) or "
                                f"pass --encoding with its real encoding") from None
            self._marks.append((self._decoded, at, state))
            start, self._decoded = self._decoded, self._decoded + len(text)
            text = text[max(0, -start):]          # a resumed run drops what was done before
            if text:
                return text
            if not raw:
                return None


def _lines(reader: TextReader, number: int = 0) -> Iterator[tuple[int, str, int]]:
    """(line number, line without its "\\n", characters read up to the end of it) for each line."""
    head: list[str] = []
    read = 0
    for block in reader.blocks():
        *complete, rest = block.split("\n")
        if complete:
            complete[0] = "".join(head) + complete[0]
            head = []
        for line in complete:
            number, read = number + 1, read + len(line) + 1
            yield number, line, read
        head.append(rest)
    last = "".join(head)
    if last:
        yield number + 1, last, read + len(last)


def _json_records(reader: TextReader, number: int = 0) -> Iterator[tuple[int, dict, int]]:
    for number, line, read in _lines(reader, number):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{reader.path} line {number} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{reader.path} line {number} must be a JSON object, got {type(record).__name__}")
        yield number, record, read


def json_lines(file: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; errors name the line."""
    with TextReader(Path(file), encoding) as reader:
        for number, record, _ in _json_records(reader):
            yield number, record


def _jsonl_texts(reader: TextReader, text_field: str, number: int = 0) -> Iterator[tuple[int, str, int]]:
    for number, record, read in _json_records(reader, number):
        if not isinstance(record.get(text_field), str):
            raise DataError(f"{reader.path} line {number} has no string field {text_field!r}; "
                            f"set --text-field to the field that holds the text")
        yield number, record[text_field], read


def safe_pieces(blocks: Iterable[str], size: int | None = None) -> Iterator[str]:
    """Join text blocks and cut them again into pieces (at least one) that tokenize to exactly the
    tokens of the whole.

    A cut is made just before a line break (``\\n`` or ``\\r\\n``) that follows a non-space
    character: no GPT-2 pre-token spans such a place (word, number and punctuation runs stop at
    whitespace; whitespace runs start there), so tokenizing the pieces separately changes nothing.
    Pieces are cut once longer than ``size`` characters (CHUNK_CHARS); a stretch without such a
    place stays whole.
    """
    size = size or CHUNK_CHARS
    pending, searched = "", 0
    for block in blocks:
        pending += block
        while len(pending) > size:
            cut = SAFE_CUT.search(pending, max(size, searched))
            if cut is None:
                searched = len(pending) - 1       # a "\r" at the end may yet be followed by "\n"
                break
            yield pending[:cut.start()]
            pending, searched = pending[cut.start():], 0
    yield pending


def _with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """Each item of a non-empty iterable (as ``safe_pieces`` is) with whether it is the last."""
    items = iter(items)
    previous = next(items)
    for item in items:
        yield previous, False
        previous = item
    yield previous, True


# --- the first pass and the split ---------------------------------------------------------------

@dataclass
class Scan:
    """What the first pass learns: how many documents there are (the split needs it), their
    characters, and where the first one is."""
    documents: int = 0
    characters: int = 0
    first: list | None = None     # [file index, JSONL line or 0]

    def add(self, file: int, line: int, characters: int) -> None:
        self.documents += 1
        self.characters += characters
        self.first = self.first or [file, line]


def scan_corpus(inputs: list[str | Path], out: Path, encoding: str, text_field: str, total_bytes: int,
                progress: bool) -> Scan:
    """Read every file once: errors before any tokenizing, and the documents counted."""
    scan = Scan()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="checking", disable=not progress,
              dynamic_ncols=True) as bar:
        for index, path in enumerate(corpus_files(inputs, out)):
            with TextReader(path, encoding, on_read=bar.update) as reader:
                if path.suffix == ".jsonl":
                    for number, text, _ in _jsonl_texts(reader, text_field):
                        if text.strip():
                            scan.add(index, number, len(text))
                else:
                    length, blank = 0, True
                    for block in reader.blocks():
                        length += len(block)
                        blank = blank and block.isspace()
                    if not blank:
                        scan.add(index, 0, length)
    if scan.documents == 0:
        raise DataError(f"the corpus {[str(i) for i in inputs]} holds no text: every file is empty or blank")
    return scan


@dataclass
class SplitPlan:
    """Which text goes to val, fixed by the first pass before anything is written."""
    documents: int
    val_documents: int            # several documents: how many are drawn for val
    cut: int | None               # the one document: the character where val starts
    single: list | None           # the one document: where it is (Scan.first)
    seed: int


def plan_split(scan: Scan, val_fraction: float, seed: int) -> SplitPlan:
    if scan.documents == 1:
        cut = int(scan.characters * (1 - val_fraction)) if val_fraction else None
        return SplitPlan(1, 0, cut, scan.first, seed)
    n_val = max(1, round(scan.documents * val_fraction)) if val_fraction else 0
    if n_val == scan.documents:
        raise DataError(f"the training split is empty: all {n_val} documents would go to val; lower val_fraction or add text")
    return SplitPlan(scan.documents, n_val, None, None, seed)


def _uniform(seed: int, index: int) -> float:
    """A draw in [0, 1) for document ``index``: the same in every run, however it was interrupted."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


# --- the walk over the corpus -------------------------------------------------------------------

class Cursor(NamedTuple):
    """Where the walk stands after a piece: everything a resumed run starts from. (A named tuple:
    one is made per document, and replacing fields of one is cheap.)"""
    file: int = 0                 # index of the file in corpus order
    byte: int = 0                 # where decoding starts again in it,
    decoder: list | None = None   # with the decoder in this state,
    skip: int = 0                 # dropping this many characters first
    line: int = 0                 # JSONL lines of the file already read
    documents: int = 0            # non-blank documents met so far
    val_documents: int = 0        # how many of them went to val
    rest_split: str = ""          # where the rest of a part-read text file goes ("" between documents)
    document_chars: int = 0       # characters of the corpus's only document already read
    chars: int = 0                # characters of all documents read (for the progress bar)


@dataclass
class Piece:
    split: str
    text: str
    ends_document: bool           # an end-of-text token follows it
    cursor: Cursor | None         # where a run can start again after it; None inside a JSONL record
    file: int = 0                 # index of its file in corpus order (the scrubbing report is per file)


class CorpusWalk:
    """The corpus as pieces to tokenize, in order, each with its split and, where a run can start
    again after it, a cursor."""

    def __init__(self, inputs: list[str | Path], out: Path, encoding: str, text_field: str, plan: SplitPlan,
                 cursor: Cursor):
        self.inputs, self.out, self.encoding, self.text_field, self.plan = inputs, out, encoding, text_field, plan
        self.cursor, self._chars = cursor, cursor.chars

    def pieces(self) -> Iterator[Piece]:
        for index, path in enumerate(corpus_files(self.inputs, self.out)):
            if index < self.cursor.file or (self.plan.single and index != self.plan.single[0]):
                continue      # done already, or blank (the corpus's only document is elsewhere)
            if index > self.cursor.file:
                self.cursor = self.cursor._replace(file=index, byte=0, decoder=None, skip=0, line=0)
            at = self.cursor
            with TextReader(path, self.encoding, at.byte, at.decoder, at.skip) as reader:
                yield from self._records(reader) if path.suffix == ".jsonl" else self._document(reader)

    def _document(self, reader: TextReader) -> Iterator[Piece]:
        """A text file: one document (none if it is blank), in the split drawn for it."""
        if self.plan.cut is not None:
            yield from self._cut_document(reader)
            return
        split, read = self.cursor.rest_split, 0
        for text, last in _with_last(safe_pieces(reader.blocks())):
            if not split:
                if last and not text.strip():
                    return
                split = self._draw_split()
            read += len(text)
            yield self._piece(split, text, last, reader.offset(read), rest_split="" if last else split)

    def _cut_document(self, reader: TextReader) -> Iterator[Piece]:
        """The corpus's only document: train up to ``plan.cut`` characters, val after."""
        start, read = self.cursor, 0
        if start.document_chars and not start.rest_split:
            return                        # read to its end before the run stopped
        if not start.rest_split:
            self._draw_split()            # counts it
        parts = [("val", None)] if start.rest_split == "val" else [("train", self.plan.cut - start.document_chars), ("val", None)]
        for split, limit in parts:
            for text, last in _with_last(safe_pieces(reader.blocks(limit))):
                read += len(text)
                after = ("val" if split == "train" else "") if last else split
                yield self._piece(split, text, last, reader.offset(read), rest_split=after,
                                  document_chars=start.document_chars + read)

    def _records(self, reader: TextReader) -> Iterator[Piece]:
        """A JSONL file: a document per record with non-blank text; a run starts again only between records."""
        for number, text, read in _jsonl_texts(reader, self.text_field, self.cursor.line):
            if not text.strip() or (self.plan.single and number != self.plan.single[1]):
                continue
            split, cut = self._draw_split(), self.plan.cut
            parts = [(split, text)] if cut is None else [("train", text[:cut]), ("val", text[cut:])]
            for part, (split, part_text) in enumerate(parts, start=1):
                for piece, last in _with_last(safe_pieces([part_text])):
                    at = reader.offset(read) if last and part == len(parts) else None
                    yield self._piece(split, piece, last, at, line=number)

    def _draw_split(self) -> str:
        """The next document's split: selection sampling of plan.val_documents of plan.documents."""
        c, plan = self.cursor, self.plan
        needed = plan.val_documents - c.val_documents
        to_val = needed > 0 and _uniform(plan.seed, c.documents) * (plan.documents - c.documents) < needed
        self.cursor = c._replace(documents=c.documents + 1, val_documents=c.val_documents + to_val)
        return "val" if to_val else "train"

    def _piece(self, split: str, text: str, ends_document: bool, at: dict | None, **changes) -> Piece:
        self._chars += len(text)
        file = self.cursor.file
        if at is None:
            return Piece(split, text, ends_document, None, file)
        self.cursor = self.cursor._replace(chars=self._chars, **at, **changes)
        return Piece(split, text, ends_document, self.cursor, file)


# --- tokenizing ---------------------------------------------------------------------------------

class PieceEncoder:
    """(text, ends document) pairs -> token arrays, with an end-of-text after each text that ends a
    document, each with what the scrubber (if any) replaced before tokenizing. One call is one
    core: the parallelism is the pool's."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, scrubber: Scrubber | None = None):
        self.tokenizer, self.dtype, self.scrubber = tokenizer, dtype, scrubber

    def __call__(self, texts: list[tuple[str, bool]]) -> list[tuple[np.ndarray, dict]]:
        eot = [self.tokenizer.eot_id]
        encoded = []
        for text, ends in texts:
            text, found = self.scrubber.scrub(text) if self.scrubber else (text, {})
            encoded.append((np.array(self.tokenizer.encode(text) + (eot if ends else []), dtype=self.dtype), found))
        return encoded


_worker_encoder: PieceEncoder | None = None


def _start_worker(spec: dict, base_dir: Path, dtype: np.dtype, scrubber: Scrubber | None) -> None:
    """In each pool process: Ctrl-C is the parent's to handle; the parent's end, even by kill -9, is
    the worker's (it would wait for work forever); the tokenizer is loaded once."""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(multiprocessing.parent_process().sentinel,), daemon=True).start()
    _worker_encoder = PieceEncoder(load_tokenizer(spec, base_dir), dtype, scrubber)


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def _encode_in_worker(texts: list[tuple[str, bool]]) -> list[tuple[np.ndarray, dict]]:
    return _worker_encoder(texts)


def _batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    """Pieces grouped into about CHUNK_CHARS characters, so that many small documents make one task."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= CHUNK_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _texts(batch: list[Piece]) -> list[tuple[str, bool]]:
    """What the encoder needs of a batch: the rest of each piece stays with the parent."""
    return [(piece.text, piece.ends_document) for piece in batch]


def _tokenized(pieces: Iterator[Piece], encoder: PieceEncoder, spec: dict, base_dir: Path,
               workers: int) -> Iterator[tuple[Piece, np.ndarray, dict]]:
    """Each piece with its tokens and what was scrubbed from it, in corpus order."""
    batches = _batches(pieces)
    if workers == 1:
        encoded = ((batch, encoder(_texts(batch))) for batch in batches)
    else:
        encoded = _encoded_in_pool(batches, spec, base_dir, encoder.dtype, workers, encoder.scrubber)
    for batch, results in encoded:
        for piece, (tokens, found) in zip(batch, results):
            yield piece, tokens, found


def _encoded_in_pool(batches: Iterator[list[Piece]], spec: dict, base_dir: Path, dtype: np.dtype, workers: int,
                     scrubber: Scrubber | None = None) -> Iterator[tuple[list[Piece], list[tuple[np.ndarray, dict]]]]:
    """Batches with their tokens from ``workers`` processes, in order, at most two per worker in
    flight (so memory stays bounded however far ahead reading could run).

    The processes come from a fork server, not forked from this process and the threads it may have
    (tqdm's, torch's); one that fails to start or dies breaks the pool, where multiprocessing.Pool
    would start it again forever. Each imports the main module again (the CLI's imports torch): the
    server imports the gptstack modules loaded here once, so that the workers fork with them.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(name for name in sys.modules if name.partition(".")[0] == "gptstack"))
    try:
        with ProcessPoolExecutor(workers, context, initializer=_start_worker,
                                 initargs=(spec, base_dir, dtype, scrubber)) as pool:
            ahead: deque = deque()
            for batch in batches:
                ahead.append((batch, pool.submit(_encode_in_worker, _texts(batch))))
                if len(ahead) >= 2 * workers:
                    batch, future = ahead.popleft()
                    yield batch, future.result()
            for batch, future in ahead:
                yield batch, future.result()
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process failed to start or died (its error, if any, is printed "
                        "above; out of memory?); run the same command again, with fewer --workers if memory "
                        "is short, to go on from the last checkpoint") from None


# --- writing ------------------------------------------------------------------------------------

class ShardWriter:
    """Appends tokens to numbered shard files of ``shard_tokens`` tokens, closing and hashing each
    as it fills; starts from the shards a checkpoint recorded."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, recorded: list[dict]):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards = [dict(shard) for shard in recorded]
        self.finished_since_checkpoint = False
        self._file = None
        for shard in self.shards:
            path = out_dir / shard["file"]
            size, expected = path.stat().st_size if path.exists() else -1, shard["tokens"] * dtype.itemsize
            if size < expected or ("sha256" in shard and size != expected):
                raise DataError(f"shard {path} is missing or not the size {out_dir / PROGRESS} records; "
                                f"remove {out_dir} to start over")
        if self.shards and "sha256" not in self.shards[-1]:
            self._reopen(self.shards[-1])
        for path in out_dir.glob(f"{split}_*.bin"):      # written by a killed run after its last checkpoint
            number = re.fullmatch(rf"{split}_(\d+)\.bin", path.name)
            if number and int(number[1]) >= len(self.shards):
                path.unlink()

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._open_next()
            shard = self.shards[-1]
            room = self.shard_tokens - shard["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            shard["tokens"] += len(part)
            if shard["tokens"] == self.shard_tokens:
                self._finish()

    def checkpoint(self) -> list[dict]:
        """The shards so far, the open one flushed to disk at the length recorded."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self.finished_since_checkpoint = False
        return [dict(shard) for shard in self.shards]

    def close(self) -> dict:
        self._finish()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}

    def _reopen(self, shard: dict) -> None:
        """The checkpoint's open shard, cut back to its recorded length (a killed run may have written more)."""
        self._file = open(self.out_dir / shard["file"], "r+b")
        self._file.truncate(shard["tokens"] * self.dtype.itemsize)
        self._hash = hashlib.sha256()
        for block in iter(lambda: self._file.read(1 << 20), b""):
            self._hash.update(block)

    def _open_next(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _finish(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1]["sha256"] = self._hash.hexdigest()
        self.finished_since_checkpoint = True


# --- the command --------------------------------------------------------------------------------

def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(inputs: list[str | Path], out_dir: str | Path, tokenizer: str | dict | Tokenizer = "gpt2",
            val_fraction: float = 0.1, seed: int = 1337, shard_tokens: int = 100_000_000,
            encoding: str = "utf-8", text_field: str = "text", workers: int | None = None,
            progress: bool = True, scrub_pii: bool = False, pii_replacement: str = "tag",
            pii_types: str = "all", pii_key: bytes | None = None) -> dict:
    """Tokenize a corpus into train/val shards under ``out_dir``, going on from where an interrupted
    run there stopped; ``workers`` processes (default: all cores). Returns the manifest. A script
    calling it needs ``if __name__ == "__main__":``: the workers import the main module again.

    ``scrub_pii`` replaces personal and secret data (data/pii.py) before tokenizing, and writes
    what it replaced, per file and type, to pii_report.json (counts only). Pseudonyms are made with
    ``pii_key`` (a training run's, that its datasets share: see pii.run_key), else with a key of this
    preparation's own, kept in out_dir/pii_key (mode 0600) until it finishes, so that a resumed
    preparation uses it too, and deleted then."""
    tok = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
    out = Path(out_dir)
    _check_options(out, val_fraction, shard_tokens, workers)
    pii = pii_settings(scrub_pii, pii_replacement, pii_types)
    files, total_bytes = _listing(inputs, out)
    job = {"inputs": [str(p) for p in inputs], "files": files, "tokenizer": _tokenizer_identity(tok),
           "encoding": encoding, "text_field": text_field, "val_fraction": val_fraction, "seed": seed,
           "shard_tokens": shard_tokens, "format_version": FORMAT_VERSION, "pii": pii}
    with _writing_alone(out):
        if (out / MANIFEST).exists():       # checked under the lock: a run may have finished meanwhile
            raise DataError(f"{out} already holds a prepared dataset; remove it or choose another --out")
        state = _interrupted_run(out, job) or _first_pass(out, job, total_bytes, progress)
        scan, cursor = Scan(**state["scan"]), Cursor(**state["cursor"])
        scrubber = Scrubber(tuple(pii["types"]), pii["replacement"], pii_key or run_key(out)) if pii else None
        found = {int(file): Counter(counts) for file, counts in state.get("pii_found", {}).items()}
        spec = save_tokenizer(tok, out)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
        writers = {split: ShardWriter(out, split, dtype, shard_tokens, state["splits"][split]) for split in SPLITS}
        if cursor.chars and progress:
            finished = sum("sha256" in shard for shards in state["splits"].values() for shard in shards)
            tqdm.write(f"{out}: going on after {finished} finished shard(s), "
                       f"{cursor.chars / scan.characters:.0%} of the text done")
        walk = CorpusWalk(inputs, out, encoding, text_field, plan_split(scan, val_fraction, seed), cursor)
        workers = max(1, min(workers or default_workers(), -(-(scan.characters - cursor.chars) // CHUNK_CHARS)))
        started, tokens_done = time.perf_counter(), 0
        with tqdm(total=scan.characters, initial=cursor.chars, unit="char", unit_scale=True, desc="tokenizing",
                  disable=not progress, dynamic_ncols=True) as bar:
            for piece, tokens, replaced in _tokenized(walk.pieces(), PieceEncoder(tok, dtype, scrubber), spec, out,
                                                      workers):
                writers[piece.split].write(tokens)
                found.setdefault(piece.file, Counter()).update(replaced)
                tokens_done += len(tokens)
                bar.set_postfix_str(f"{tokens_done / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
                bar.update(len(piece.text))
                if piece.cursor is not None and any(w.finished_since_checkpoint for w in writers.values()):
                    state.update(cursor=piece.cursor._asdict(), splits={s: w.checkpoint() for s, w in writers.items()},
                                 pii_found=found)
                    write_text_atomic(out / PROGRESS, json.dumps(state))
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": spec,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "seed": seed,
            "documents": scan.documents,
            "characters": scan.characters,
            "inputs": [str(p) for p in inputs],
            "splits": {split: writer.close() for split, writer in writers.items()},
            "pii": pii,
        }
        if pii:
            report = pii_report(pii, {str(path): found.get(index, Counter())
                                      for index, path in enumerate(corpus_files(inputs, out))})
            manifest["pii"] = {**pii, "report": PII_REPORT, "replaced": report["replaced"]}
            write_text_atomic(out / PII_REPORT, json.dumps(report, indent=2))
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
        (out / PROGRESS).unlink()
        if pii_key is None:     # done: no one can now link its pseudonyms to values by hashing guesses
            (out / KEY_FILE).unlink(missing_ok=True)
    return manifest


def pii_report(pii: dict, found: dict[str, Counter]) -> dict:
    """How many of each type were replaced in each file and in all: counts, never the values."""
    total = sum(found.values(), Counter())
    return {**pii, "replaced": {kind: total[kind] for kind in pii["types"]},
            "files": {name: {kind: counts[kind] for kind in pii["types"]} for name, counts in found.items()}}


def _check_options(out: Path, val_fraction: float, shard_tokens: int, workers: int | None) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; choose a folder for the prepared dataset")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")


@contextmanager
def _writing_alone(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out``/.lock: a second run would take the first's live checkpoint
    for a crashed run's and cut its shards back. The file stays when the run ends: removing it would
    let a run that opened it just before and one that creates it anew both hold "the" lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a")
    except OSError as exc:
        raise DataError(f"cannot write to {out}: {exc.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another `gptstack prepare` is writing {out}; wait for it or use another --out") from None
        yield


def _first_pass(out: Path, job: dict, total_bytes: int, progress: bool) -> dict:
    """A new run's state: the corpus read once, checked and counted, recorded before any tokenizing."""
    scan = scan_corpus(job["inputs"], out, job["encoding"], job["text_field"], total_bytes, progress)
    plan_split(scan, job["val_fraction"], job["seed"])      # an impossible split fails before any checkpoint
    state = {"job": job, "scan": asdict(scan), "cursor": Cursor()._asdict(), "splits": {s: [] for s in SPLITS}}
    write_text_atomic(out / PROGRESS, json.dumps(state))
    return state


def _listing(inputs: list[str | Path], out: Path) -> tuple[str, int]:
    """A digest of the input files' names, sizes and modification times (what tells a changed
    corpus from the one a checkpoint was made of), and their total size."""
    digest, total = hashlib.sha256(), 0
    for path in corpus_files(inputs, out):
        stat = path.stat()
        digest.update(os.fsencode(path) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
    return digest.hexdigest(), total


def _tokenizer_identity(tok: Tokenizer) -> dict:
    path = getattr(tok, "path", None)      # a tokenizer.json: its content, wherever it is
    return {"kind": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "sha256": sha256_file(path) if path else None}


def _interrupted_run(out: Path, job: dict) -> dict | None:
    """The checkpoint an interrupted run of this same job left in ``out``, if any; another job's is an error."""
    path = out / PROGRESS
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        recorded = state["job"]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise DataError(f"{path} is corrupted; remove {out} to start over") from None
    changed = ["input files (names, sizes or modification times)" if key == "files" else key.replace("_", " ")
               for key in job if recorded.get(key) != job[key]]
    if changed:
        raise DataError(f"{out} holds an unfinished preparation of another corpus or with other options "
                        f"({', '.join(changed)} differ); run the original command again to finish it, "
                        f"or remove {out} to start over")
    return state


def prepared_location(path: str | Path, cache_dir: str | Path) -> Path:
    """Where ``ensure_prepared`` keeps ``path``'s tokens: the path itself if it is a prepared dataset."""
    source = Path(path)
    if (source / MANIFEST).exists():
        return source
    if not source.exists():
        raise FileNotFoundError(f"data {source} does not exist; pass a dataset made by `gptstack prepare` or a text file/folder")
    return Path(cache_dir) / source.stem


def ensure_prepared(path: str | Path, cache_dir: str | Path, tokenizer: str = "gpt2", progress: bool = True,
                    pii: dict | None = None, pii_key: bytes | None = None) -> Path:
    """A prepared dataset dir as is; raw text (a file or folder) prepared once into cache_dir/<its name>
    (an interrupted preparation goes on), scrubbed as ``pii`` (config.pii_settings) asks, pseudonyms
    made with ``pii_key`` (see ``prepare``). A dataset that was not scrubbed so is refused when
    scrubbing is asked for."""
    target = prepared_location(path, cache_dir)
    if not (target / MANIFEST).exists():
        prepare([Path(path)], target, tokenizer=tokenizer, progress=progress, scrub_pii=pii is not None,
                **({"pii_replacement": pii["replacement"], "pii_types": ",".join(pii["types"])} if pii else {}),
                pii_key=pii_key)
    done = json.loads((target / MANIFEST).read_text()).get("pii")
    if pii and (not done or {k: done[k] for k in pii} != pii):
        raise DataError(f"{target} was prepared {'with other scrubbing' if done else 'without --scrub-pii'} than "
                        f"asked for ({pii}); prepare it again (remove it if it is a cached copy of raw text)")
    return target
