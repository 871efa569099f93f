"""Tokenizers behind one small interface.

Two kinds are supported:
- ``gpt2``: the genuine GPT-2 / GPT-3 byte-level BPE (r50k_base, 50,257 tokens), shipped in
  ``gptstack/assets/tokenizer`` and loaded offline through tiktoken (Rust, fast).
- ``hf``: any Hugging Face ``tokenizer.json`` (tokenizers library), including a byte-level BPE
  trained on the user's own corpus with :func:`train_bpe`.

A tokenizer is described by a small JSON "spec" that checkpoints and prepared datasets store, so
that whatever reads them later tokenizes exactly the same way.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Protocol

ASSETS = Path(__file__).parent / "assets" / "tokenizer"
GPT2_EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes | None: ...
    def spec(self) -> dict: ...
    def files(self) -> dict[str, bytes]: ...


class GPT2Tokenizer:
    """OpenAI's r50k_base BPE via tiktoken, built from the shipped ranks file (no download)."""

    name = "gpt2"

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        self._enc = tiktoken.Encoding(
            name="r50k_base",
            pat_str=r50k_pat_str,
            mergeable_ranks=load_tiktoken_bpe(str(ASSETS / "r50k_base.tiktoken")),
            special_tokens={GPT2_EOT: 50256},
            explicit_n_vocab=50257,
        )
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        # User text is data: "<|endoftext|>" typed by a user is encoded as plain text, never as EOT.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def spec(self) -> dict:
        """What checkpoints and datasets store to load this tokenizer again."""
        return {"kind": "gpt2"}

    def files(self) -> dict[str, bytes]:
        """Files to store beside the spec: none, the BPE ships with the package."""
        return {}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``; the file is copied into checkpoints that use it."""

    name = "hf"

    def __init__(self, path: str | Path, eot_token: str | None = None, contents: bytes | None = None) -> None:
        """``contents``: the file's bytes when they were read already (decrypted from an encrypted
        checkpoint); ``path`` then only names it."""
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        if contents is None and not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist; pass the path of a "
                                 "Hugging Face tokenizer.json or train one with `gptstack train-tokenizer`")
        self.contents = self.path.read_bytes() if contents is None else contents
        try:
            self._tok = _HFTok.from_str(self.contents.decode("utf-8"))
        except Exception as exc:  # the library raises plain Exceptions for bad files
            raise TokenizerError(f"{self.path} is not a valid tokenizer.json: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = [eot_token] if eot_token else [GPT2_EOT, "</s>", "<eos>", "[SEP]"]
        found = [self._tok.token_to_id(t) for t in candidates if t and self._tok.token_to_id(t) is not None]
        if not found:
            raise TokenizerError(f"{self.path} has no end-of-text token (looked for {candidates}); "
                                 "add one, e.g. train with `gptstack train-tokenizer` which adds <|endoftext|>")
        self.eot_id = found[0]
        self.eot_token = self._tok.id_to_token(self.eot_id)
        self._byte_decoder = _byte_level_decoder() if _is_byte_level(self._tok) else None
        self._special_ids = frozenset(self._tok.get_added_tokens_decoder())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        """Raw bytes of one token for byte-level BPEs; None when the tokenizer is not byte-level."""
        if self._byte_decoder is None:
            return None
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode()
        return bytes(self._byte_decoder[ch] for ch in piece)

    def spec(self) -> dict:
        """What checkpoints and datasets store to load this tokenizer again, with :meth:`files`."""
        return {"kind": "hf", "path": "tokenizer.json", "eot_token": self.eot_token}

    def files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self.contents}


def _is_byte_level(tok) -> bool:
    import json

    decoder = json.loads(tok.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's printable byte alphabet: each byte 0..255 is drawn as one unicode char."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def load_tokenizer(spec: str | dict | None = None, base_dir: str | Path | None = None) -> Tokenizer:
    """Build a tokenizer from a spec dict, ``"gpt2"``, or a path to a tokenizer.json.

    ``base_dir`` resolves relative paths inside specs stored in checkpoints and datasets.
    """
    if spec is None or spec == "gpt2" or spec in ("r50k_base", "gpt3"):
        return _gpt2()
    if isinstance(spec, str):
        return HFTokenizer(spec)
    kind = spec.get("kind")
    if kind == "gpt2":
        return _gpt2()
    if kind == "hf":
        path = Path(spec["path"])
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return HFTokenizer(path, spec.get("eot_token"))
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; use 'gpt2' or a path to a tokenizer.json")


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path,
                   stored: Callable[[str, bytes], bytes] | None = None) -> dict:
    """Write the tokenizer's files into ``directory``, each as ``stored(name, data)`` makes it (an
    encrypted checkpoint seals them); returns the spec that loads it from there."""
    for name, data in tokenizer.files().items():
        (Path(directory) / name).write_bytes(stored(name, data) if stored else data)
    return tokenizer.spec()


@lru_cache(maxsize=1)
def _gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def train_bpe(files: list[str | Path], vocab_size: int, out_path: str | Path) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE on the user's own text and save it as tokenizer.json."""
    from tokenizers import Tokenizer as _HFTok, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise TokenizerError(f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT2_EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(out_path)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a multi-byte UTF-8 character.

    Byte-level tokenizers go through an incremental UTF-8 decoder (O(1) per token); others fall
    back to decoding the running sequence and emitting the new suffix.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        raw = self.tokenizer.token_bytes(token_id)
        if raw is not None:
            return self._utf8.decode(raw)
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._emitted = text[len(self._emitted):], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character)."""
        tail = self._utf8.decode(b"", final=True)
        if self._ids:
            text = self.tokenizer.decode(self._ids)
            tail += text[len(self._emitted):]
            self._emitted = text
        return tail
