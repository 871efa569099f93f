"""Checkpoint directories: the unit that train, finetune, eval, export, generate and serve exchange.

Layout (format_version 1)::

    DIR/config.json          {"format_version", "model": ModelConfig, "tokenizer": spec, "meta": {...},
                              optional "head": {"kind": "classification", "labels": [...]} or
                                  {"kind": "token_classification", "labels": [...], "context": ...},
                              optional "adapter": LoRAConfig}
    DIR/model.safetensors    weights (the LM head is tied to transformer.wte and not stored twice)
    DIR/tokenizer.json       only for Hugging Face tokenizers
    DIR/adapter.safetensors  optional: LoRA adapters kept apart from the base weights; their shape
                             is config.json["adapter"] (see lora.py)
    DIR/train_state.safetensors + DIR/train_state.json   optional: optimizer, RNG, step, data position
    DIR/encryption.json      only when encrypted: cipher, key id and scope (crypto.py); every other file
                             above is then sealed with AES-256-GCM, its name bound to it
    DIR/checksums.json       SHA-256 of every file above as stored (of the ciphertext when encrypted),
                             verified on load, so a checkpoint's integrity is checked without its key

Weights and state are safetensors plus JSON, never pickle. A checkpoint is written to a temporary
sibling directory, flushed, then renamed into place, so a crash leaves the previous one intact; a
write that fails (disk full) leaves no temporary directory and raises a CheckpointError saying so.
The key of an encrypted checkpoint comes from the environment (crypto.key_from_environment).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, load_file, save as safetensors_bytes, save_file

from .crypto import EncryptionError, FileCipher, key_from_environment
from .files import fsync_path, sha256_file
from .config import ConfigError, ModelConfig, from_dict
from .heads import SequenceClassifier, TokenClassifier
from .lora import LoRAConfig, add_lora, is_lora_key, merge_lora
from .model import GPT
from .tokenizer import HFTokenizer, Tokenizer, TokenizerError, load_tokenizer, save_tokenizer

FORMAT_VERSION = 1
TIED_KEYS = ("lm_head.weight",)
CHECKSUMS = "checksums.json"
ENCRYPTION = "encryption.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or of an unknown format; the message says how to proceed."""


HEADS = {"classification": SequenceClassifier, "token_classification": TokenClassifier}
Head = SequenceClassifier | TokenClassifier


def save_checkpoint(directory: str | Path, model: GPT | Head, tokenizer: Tokenizer,
                    meta: dict | None = None, train_state: dict | None = None, encrypt: bool = False) -> Path:
    """Write a checkpoint atomically. ``train_state`` is any nested dict of tensors and JSON values
    (optimizer state dicts, RNG states, counters). A task head is stored beside the weights;
    unmerged LoRA adapters go to their own file. ``encrypt``: seal every file with the key from the
    environment (crypto.py)."""
    directory = Path(directory)
    cipher = new_cipher(directory) if encrypt else None
    with staged_save(directory) as tmp:
        files = CheckpointWriter(tmp, cipher)
        head = model if isinstance(model, (SequenceClassifier, TokenClassifier)) else None
        gpt = unwrap(head.gpt if head else model)
        state = {k: v.detach().contiguous().cpu() for k, v in gpt.state_dict().items() if k not in TIED_KEYS}
        adapter = {k: state.pop(k) for k in [k for k in state if is_lora_key(k)]}
        config = {"format_version": FORMAT_VERSION, "model": _asdict(gpt.config),
                  "tokenizer": files.tokenizer(tokenizer), "meta": meta or {}}
        if head is not None:
            state.update({k: v.detach().contiguous().cpu() for k, v in head.head_state().items()})
            config["head"] = head.head_config()
        if adapter:
            files.tensors("adapter.safetensors", adapter)
            config["adapter"] = gpt.lora_config
        files.tensors("model.safetensors", state)
        files.json("config.json", config)
        if train_state is not None:
            files.train_state(train_state)
        files.finish()
    return directory


def new_cipher(directory: Path) -> FileCipher:
    """The cipher a new encrypted checkpoint is sealed with."""
    try:
        return FileCipher.fresh(key_from_environment())
    except EncryptionError as exc:
        raise CheckpointError(f"cannot write {directory} encrypted: {exc}") from None


class CheckpointWriter:
    """Writes a checkpoint's files into its staging directory, in the clear or sealed by ``cipher``."""

    def __init__(self, staging: Path, cipher: FileCipher | None):
        self.staging, self.cipher = staging, cipher

    def stored(self, name: str, data: bytes) -> bytes:
        """``data`` as the file ``name`` stores it: sealed when the checkpoint is encrypted."""
        return data if self.cipher is None else self.cipher.seal(name, data)

    def write(self, name: str, data: bytes) -> None:
        (self.staging / name).write_bytes(self.stored(name, data))

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.cipher is None:   # streamed to disk, with no copy in memory
            save_file(tensors, self.staging / name, metadata={"format": "pt"})
        else:
            self.write(name, safetensors_bytes(tensors, metadata={"format": "pt"}))

    def json(self, name: str, value: Any) -> None:
        self.write(name, json.dumps(value, indent=2).encode())

    def tokenizer(self, tokenizer: Tokenizer) -> dict:
        """Stores the tokenizer's files; returns its spec for config.json."""
        return save_tokenizer(tokenizer, self.staging, self.stored)

    def train_state(self, state: dict) -> None:
        tensors, skeleton = split_tensors(state)
        self.tensors("train_state.safetensors", tensors)
        self.json("train_state.json", skeleton)

    def finish(self, checksums: dict[str, str] | None = None) -> None:
        """Adds encryption.json and checksums.json (of every file not in ``checksums``, already
        hashed by the processes that wrote them), and flushes it all to disk."""
        if self.cipher is not None:
            (self.staging / ENCRYPTION).write_text(json.dumps(self.cipher.public(), indent=2))
        checksums = dict(checksums or {})
        checksums.update({p.name: sha256_file(p) for p in self.staging.iterdir() if p.name not in checksums})
        (self.staging / CHECKSUMS).write_text(json.dumps(dict(sorted(checksums.items())), indent=2))
        for p in self.staging.iterdir():
            fsync_path(p)
        fsync_path(self.staging)


@contextmanager
def staged_save(directory: Path):
    """A fresh temporary sibling of ``directory`` (``.NAME.saving-XXXX``) to write a save into,
    renamed into place at the end; removed when the save fails, where a write error such as a full
    disk, or too little memory to seal a file, becomes a CheckpointError saying what happened and
    what ``directory`` holds now. Directories left by saves of ``directory`` that were killed go,
    and only those: a sibling such as ``.NAME.v2.old`` or another save's ``.NAME.v2.saving-XXXX``
    does not have their shape (the prefix, then mkdtemp's 8 random characters)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{directory.name}.saving-"
    for stale in directory.parent.glob(glob.escape(prefix) + "?" * 8):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=directory.parent))
    try:
        yield tmp
        replace_dir(tmp, directory)
    except BaseException as exc:
        renamed = not tmp.exists()      # the new checkpoint is in place: only flushing it failed
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError, MemoryError)):
            raise CheckpointError(save_failure(directory, exc, renamed)) from exc
        raise


def save_failure(directory: Path, exc: BaseException, renamed: bool) -> str:
    """What to tell the user when writing ``directory`` failed with ``exc`` (``renamed``: after the
    new checkpoint was renamed into place)."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(exc, MemoryError):
        reason = "out of memory (an encrypted save holds each file, sealed, in memory)"
    else:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    advice = ("free disk space (or raise the file size limit) and save again" if full
              else "check that the directory is writable, the disk healthy and memory sufficient")
    old = directory.with_name(f".{directory.name}.old")
    if renamed:
        kept = f"{directory} holds the new checkpoint, but it may not have reached the disk: verify it or save again"
    elif directory.exists():
        kept = f"{directory} still holds the previous checkpoint"
    elif old.is_dir():
        kept = f"{old} holds the previous checkpoint (the next save or run puts it back)"
    else:
        kept = "nothing was written"
    return f"could not save the checkpoint {directory}: {reason}; {kept}; {advice}"


def recover_interrupted_save(target: Path) -> None:
    """Put back the previous checkpoint if a save was killed between moving it aside and renaming
    the new one into place (see replace_dir), so a resume finds it."""
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)


def replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; at every moment either ``target`` or its ``.old`` sibling holds a
    complete checkpoint (the last good one first put back, should an earlier save have been killed)."""
    recover_interrupted_save(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _asdict(cfg: ModelConfig) -> dict:
    from dataclasses import asdict
    return asdict(cfg)


def verify(directory: str | Path) -> dict:
    """Check the directory is a checkpoint and every file matches its checksum; return config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        old = directory.with_name(f".{directory.name}.old")
        hint = f" (a previous save was interrupted: {old} holds the last good copy)" if old.is_dir() else ""
        raise CheckpointError(f"checkpoint {directory} does not exist{hint}")
    sums_file = directory / CHECKSUMS
    if not sums_file.exists():
        raise CheckpointError(f"{directory} is not a gptstack checkpoint (no {CHECKSUMS}); "
                              "for a Hugging Face model directory use `gptstack import` first")
    checksums = parse_json(sums_file, sums_file.read_bytes())
    if not isinstance(checksums, dict) or "config.json" not in checksums:
        raise CheckpointError(f"{sums_file} is corrupted; restore the checkpoint from a copy")
    for name, expected in checksums.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}; restore it from a copy")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path} is corrupted or truncated (SHA-256 mismatch); "
                                  "restore it from a copy or use another checkpoint (e.g. best/ or last/)")
    config = parse_json(directory / "config.json", read_file(directory, "config.json"))
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise CheckpointError(f"{directory} has checkpoint format {found}, this gptstack reads format {FORMAT_VERSION}")
    for name, kinds in (("model", dict), ("tokenizer", dict), ("adapter", (dict, type(None))),
                        ("head", (dict, type(None)))):
        if not isinstance(config.get(name), kinds):
            raise CheckpointError(f"{directory}/config.json has no valid {name!r} entry; restore it from a copy")
    return config


def parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupted (not JSON); restore the checkpoint from a copy") from None


def is_encrypted(directory: str | Path) -> bool:
    return (Path(directory) / ENCRYPTION).exists()


def cipher_of(directory: Path) -> FileCipher | None:
    """The cipher that opens an encrypted checkpoint's files (key from the environment); None for a
    checkpoint in the clear."""
    if not is_encrypted(directory):
        return None
    try:
        public = parse_json(directory / ENCRYPTION, (directory / ENCRYPTION).read_bytes())
        return FileCipher.for_stored(public, key_from_environment())
    except EncryptionError as exc:
        raise CheckpointError(f"cannot read {directory}: {exc}") from None


def read_file(directory: Path, name: str) -> bytes:
    """A checkpoint file's bytes, decrypted when the checkpoint is encrypted."""
    path = directory / name
    cipher = cipher_of(directory)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if cipher is None:
        return data
    try:
        return cipher.open(name, data)
    except EncryptionError:
        raise CheckpointError(f"{path} could not be decrypted: wrong key or the file was modified; "
                              "restore it from a copy") from None


def model_config_of(directory: Path, config: dict) -> ModelConfig:
    try:
        return from_dict(ModelConfig, config["model"]).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/config.json has an invalid model config: {exc}") from None


def tokenizer_of(directory: Path, config: dict) -> Tokenizer:
    """The tokenizer config.json names, its file (if any) read from the checkpoint."""
    spec = config["tokenizer"]
    try:
        if spec.get("kind") == "hf" and is_encrypted(directory):
            name = str(spec.get("path"))
            return HFTokenizer(directory / name, spec.get("eot_token"), contents=read_file(directory, name))
        return load_tokenizer(spec, base_dir=directory)
    except TokenizerError as exc:
        raise CheckpointError(f"{directory} has an unusable tokenizer: {exc}") from None


def describe(directory: str | Path) -> tuple[ModelConfig, Tokenizer, dict]:
    """A checkpoint's model config, tokenizer and config.json without its weights: all that a
    process needs that routes requests but never runs the model (serve/replicas.py)."""
    directory = Path(directory)
    config = verify(directory)
    return model_config_of(directory, config), tokenizer_of(directory, config), config


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, merge_adapter: bool = True) -> tuple[GPT, Tokenizer, dict]:
    """Model (in eval mode), tokenizer and config.json of a checkpoint. LoRA adapters stored apart
    are merged into the weights unless ``merge_adapter`` is False."""
    directory = Path(directory)
    config = verify(directory)
    model_cfg = model_config_of(directory, config)
    if config.get("sharded"):   # written by training (sharded_checkpoint.py)
        model, tokenizer = load_sharded_model(directory, config)
        return model.to(device=device, dtype=dtype).eval(), tokenizer, config
    with torch.device("meta"):
        model = GPT(model_cfg)
    # Loading maps names the model has outgrown (see model.split_fused_qkv), so check what it left
    # missing rather than the file's names; other keys (a classifier's head) are not the backbone's.
    missing, _ = fill(model, directory, "model.safetensors")
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing:
        raise CheckpointError(f"{directory}/model.safetensors lacks {sorted(missing)[:5]}...; it does not match its config")
    model.lm_head.weight = model.transformer.wte.weight
    if config.get("adapter"):
        try:
            add_lora(model, LoRAConfig(**config["adapter"]))
        except TypeError as exc:
            raise CheckpointError(f"{directory}/config.json has an invalid adapter: {exc}") from None
        missing, unexpected = fill(model, directory, "adapter.safetensors")
        if unexpected or any(is_lora_key(k) for k in missing):
            raise CheckpointError(f"{directory}/adapter.safetensors does not match the adapter in its config.json")
    model.to(device=device, dtype=dtype)
    if config.get("adapter") and merge_adapter:
        merge_lora(model)
    return model.eval(), tokenizer_of(directory, config), config


def fill(model: GPT, directory: Path, name: str) -> tuple[list[str], list[str]]:
    """Load the weights of file ``name`` into ``model``; returns the keys missing and unexpected."""
    try:
        return model.load_state_dict(load_weights(directory, name), strict=False, assign=True)
    except RuntimeError as exc:   # shapes that are not those of config.json
        raise CheckpointError(f"{directory}/{name} does not match its config.json: "
                              f"{str(exc).splitlines()[-1].strip()}") from None


def with_config(model: GPT, cfg: ModelConfig) -> GPT:
    """A GPT of config ``cfg`` (e.g. other dropout rates) holding ``model``'s weights."""
    fresh = GPT(cfg.validate())
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"init_from weights do not fit this model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return fresh


def load_classifier(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    merge_adapter: bool = True) -> tuple[SequenceClassifier, Tokenizer, dict]:
    """A checkpoint written by a classification fine-tune: backbone plus head, in eval mode."""
    return _load_with_head(directory, "classification", device, dtype, merge_adapter)


def load_token_classifier(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                          merge_adapter: bool = True) -> tuple[TokenClassifier, Tokenizer, dict]:
    """A checkpoint written by a token-classification (NER) fine-tune: backbone plus head, in eval mode."""
    return _load_with_head(directory, "token_classification", device, dtype, merge_adapter)


def _load_with_head(directory, kind: str, device, dtype, merge_adapter: bool) -> tuple[Head, Tokenizer, dict]:
    model, tokenizer, config = load_model(directory, device, dtype, merge_adapter)
    head = attach_head(model, directory, config)
    if not isinstance(head, HEADS[kind]):
        raise CheckpointError(f"{directory} has no {kind.replace('_', '-')} head; fine-tune one with "
                              f"`gptstack finetune --task {kind}`")
    return head, tokenizer, config


def attach_head(model: GPT, directory: str | Path, config: dict) -> Head | None:
    """The checkpoint's task head over an already loaded (perhaps quantized) ``model``, sharing its
    weights; None when the checkpoint has no head."""
    head = config.get("head")
    if not head:
        return None
    if head.get("kind") not in HEADS:
        raise CheckpointError(f"{directory} has a head of kind {head.get('kind')!r}; this gptstack knows {sorted(HEADS)}")
    options = ({k: head[k] for k in ("context", "word_features", "crf") if k in head} if head["kind"] == "token_classification"
               else {"pooling": head.get("pooling", "last")})    # checkpoints from before pooling read the last state
    module = HEADS[head["kind"]](model, head["labels"], **options)
    try:
        module.load_head_state(load_weights(directory))
    except RuntimeError as exc:     # torch's missing keys or wrong shapes, e.g. "crf": true without crf.* weights
        raise CheckpointError(f"{directory} does not hold the weights of the {head['kind']} head its config.json "
                              f"describes ({options}): {exc}") from None
    weight = model.transformer.wte.weight
    return module.to(device=weight.device, dtype=weight.dtype).eval()


def load_weights(directory: str | Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    directory = Path(directory)
    try:
        if is_encrypted(directory):   # decrypted in memory: the file's size again, briefly twice
            return load_safetensors(read_file(directory, name))
        return load_file(directory / name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {directory}/{name}: {exc}") from None


def load_train_state(directory: str | Path) -> dict | None:
    directory = Path(directory)
    if not (directory / "train_state.json").exists():
        return None
    skeleton = parse_json(directory / "train_state.json", read_file(directory, "train_state.json"))
    tensors = load_weights(directory, "train_state.safetensors")
    try:
        return join_tensors(tensors, skeleton)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}/train_state.json does not match train_state.safetensors: {exc!r}") from None


def split_tensors(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Separate the tensors of a nested structure (for safetensors) from the rest (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__tuple__" if isinstance(value, tuple) else "__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        return value

    return tensors, walk(obj, prefix or "state")


def join_tensors(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {join_tensors(tensors, k): join_tensors(tensors, v) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(join_tensors(tensors, v) for v in skeleton["__tuple__"])
        if "__list__" in skeleton:
            return [join_tensors(tensors, v) for v in skeleton["__list__"]]
    return skeleton


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / ".metadata").exists()


@contextmanager
def quietly_in_one_process():
    """Distributed Checkpoint used by one process, which warns that it assumes so: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_sharded_model(directory: str | Path, config: dict) -> tuple[GPT, Tokenizer]:
    """The whole model of a sharded checkpoint (see sharded_checkpoint.py) in this one process
    (``config`` is its verified config.json)."""
    directory = Path(directory)
    model_cfg = from_dict(ModelConfig, config["model"]).validate()
    with torch.device("meta"):
        model = GPT(model_cfg)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    state = {"model": model.state_dict()}   # views of the model's own tensors: DCP fills them in place
    load_dcp(state, directory, f"{directory} does not hold a {model_cfg.n_layer}-layer GPT as its config says", no_dist=True)
    return model, tokenizer_of(directory, config)


def load_dcp(state: dict, directory: Path, mismatch: str, no_dist: bool) -> None:
    """Fill ``state`` in place from the DCP files in ``directory`` (``no_dist``: in this process alone),
    decrypted when the checkpoint is encrypted; a state they do not fit is a CheckpointError starting
    with ``mismatch``."""
    import torch.distributed.checkpoint as dcp
    from .dcp_io import SealedFiles, dcp_failures_raised
    reader = dcp.FileSystemReader(directory)
    if is_encrypted(directory):
        reader.fs = SealedFiles(read=read_file)
    try:
        with quietly_in_one_process(), dcp_failures_raised():
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except CheckpointError:
        raise
    except Exception as exc:   # DCP reports a shape or key mismatch as a generic exception
        raise CheckpointError(f"{mismatch}: {str(exc).splitlines()[0]}") from None
