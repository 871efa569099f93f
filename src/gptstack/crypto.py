"""Encryption at rest: AES-256-GCM over files in chunks, with the key from a file or the environment.

A key is 32 random bytes written as 64 hexadecimal digits (``gptstack keygen --out FILE``). It is
read from the file GPTSTACK_KEY_FILE names (what ``--key-file`` sets), else from GPTSTACK_KEY itself;
never from the command line, where other users see it (``ps``) and shells keep it (history).

A sealed file is MAGIC (its last byte the format version), then its chunks of CHUNK_BYTES (the
last one shorter), each sealed on its own: a random 12-byte nonce, the GCM ciphertext, its 16-byte
tag. (GCM takes at most 2 GiB at once, and checkpoint files are larger.) The authenticated data of a
chunk is MAGIC + scope + its index + whether it is the last + the file's name, so a file that was
edited, renamed, moved in from another checkpoint (another scope), had chunks reordered or was cut
short at a chunk boundary does not open. Format 1, the whole file sealed at once, was never
released and is not read. The
public half of a checkpoint's encryption (cipher, key id, scope) is stored beside its files; the key
id, an HMAC of the key, tells a wrong key apart from a modified file without revealing the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CIPHER = "AES-256-GCM"
FORMAT = 2
CHUNK_BYTES = 64 << 20
KEY_FILE_ENV = "GPTSTACK_KEY_FILE"
KEY_ENV = "GPTSTACK_KEY"
KEY_BYTES = 32
SCOPE_BYTES = 16
MAGIC = b"GPTSENC" + bytes([FORMAT])
NONCE_BYTES = 12
TAG_BYTES = 16
HOW_TO_GIVE_A_KEY = (f"pass --key-file FILE, or set {KEY_FILE_ENV}=FILE or {KEY_ENV}=<64 hex digits> "
                     "(`gptstack keygen --out FILE` makes a key)")


class EncryptionError(ValueError):
    """A key is missing or malformed, or a file does not decrypt; the message says what to do."""


def parse_key(text: str, source: str) -> bytes:
    digits = text.strip()
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:   # the message never repeats the text: it may be a mistyped key
        raise EncryptionError(f"{source} must hold a key of 64 hexadecimal digits (32 bytes), not "
                              f"{len(digits)} characters of something else; `gptstack keygen --out FILE` makes one")
    return key


def key_from_environment() -> bytes | None:
    """The key in the file GPTSTACK_KEY_FILE names, else in GPTSTACK_KEY; None when neither is set."""
    if path := os.environ.get(KEY_FILE_ENV):
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise EncryptionError(f"cannot read the key file {path} (--key-file / {KEY_FILE_ENV}): "
                                  f"{exc.strerror}") from None
        return parse_key(text, f"the key file {path}")
    if text := os.environ.get(KEY_ENV):
        return parse_key(text, KEY_ENV)
    return None


def write_new_key(path: str | Path) -> Path:
    """A fresh random key in a new file that only its owner can read; an existing file is never
    overwritten, since whatever its key encrypted would be lost with it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise EncryptionError(f"{path} exists; keygen does not overwrite a key: choose another path") from None
    except OSError as exc:    # a missing or unwritable directory
        raise EncryptionError(f"cannot create the key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_BYTES).hex() + "\n")
    return path


def key_id(key: bytes) -> str:
    """A public name for a key: which key sealed a file, without revealing it."""
    return hmac.new(key, b"gptstack key id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class FileCipher:
    """Seals and opens the files of one checkpoint (``scope``: its random id)."""

    key: bytes = field(repr=False)
    scope: bytes
    chunk_bytes: int = CHUNK_BYTES     # of plaintext per sealed chunk (stored in the public description)

    @classmethod
    def fresh(cls, key: bytes | None) -> FileCipher:
        if key is None:
            raise EncryptionError(f"encryption needs a key: {HOW_TO_GIVE_A_KEY}")
        return cls(key, os.urandom(SCOPE_BYTES))

    @classmethod
    def for_stored(cls, public: object, key: bytes | None) -> FileCipher:
        """The cipher of stored files whose :meth:`public` description is ``public``, if ``key`` is theirs."""
        if not isinstance(public, dict) or public.get("cipher") != CIPHER or public.get("format") != FORMAT:
            raise EncryptionError(f"its encryption is not {CIPHER} format {FORMAT}, the one this gptstack reads")
        try:
            scope, chunk_bytes = bytes.fromhex(public["scope"]), public["chunk_bytes"]
        except (KeyError, TypeError, ValueError):
            raise EncryptionError("its encryption description has no valid scope; restore it from a copy") from None
        if type(chunk_bytes) is not int or not 0 < chunk_bytes < 2 ** 31 - TAG_BYTES:
            raise EncryptionError("its encryption description has no valid chunk size; restore it from a copy")
        if key is None:
            raise EncryptionError(f"it is encrypted ({CIPHER}) and no key was given: {HOW_TO_GIVE_A_KEY}")
        if key_id(key) != public.get("key_id"):
            raise EncryptionError(f"it was encrypted with another key (key id {public.get('key_id')}; the key "
                                  f"given has id {key_id(key)}): give the key it was saved with")
        return cls(key, scope, chunk_bytes)

    def public(self) -> dict:
        """What may be stored in the clear beside the sealed files."""
        return {"cipher": CIPHER, "format": FORMAT, "key_id": key_id(self.key), "scope": self.scope.hex(),
                "chunk_bytes": self.chunk_bytes}

    def seal(self, name: str, data: bytes) -> bytes:
        aead, size = AESGCM(self.key), self.chunk_bytes
        starts = range(0, max(len(data), 1), size)    # an empty file is one empty chunk
        sealed = [MAGIC]
        for index, start in enumerate(starts):
            nonce = os.urandom(NONCE_BYTES)
            bound = self._bound_to(name, index, start + size >= len(data))
            sealed += [nonce, aead.encrypt(nonce, data[start:start + size], bound)]
        return b"".join(sealed)

    def open(self, name: str, sealed: bytes) -> bytes:
        """The plaintext of ``sealed``, stored as ``name``; EncryptionError unless it is exactly what
        :meth:`seal` wrote for that name with this key and scope."""
        if not sealed.startswith(MAGIC) or len(sealed) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
            raise EncryptionError(f"{name} is not a file sealed by gptstack format {FORMAT}")
        aead, record = AESGCM(self.key), NONCE_BYTES + self.chunk_bytes + TAG_BYTES
        plain = []
        for index, start in enumerate(range(len(MAGIC), len(sealed), record)):
            nonce, body = sealed[start:start + NONCE_BYTES], sealed[start + NONCE_BYTES:start + record]
            try:
                plain.append(aead.decrypt(nonce, body, self._bound_to(name, index, start + record >= len(sealed))))
            except (InvalidTag, ValueError):    # (a cut-off last chunk can be too short for a nonce)
                raise EncryptionError(f"{name} could not be decrypted: wrong key or the file was modified") from None
        return b"".join(plain)

    def _bound_to(self, name: str, index: int, last: bool) -> bytes:
        return MAGIC + self.scope + index.to_bytes(8, "big") + bytes([last]) + name.encode()
