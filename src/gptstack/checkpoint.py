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
    DIR/checksums.json       SHA-256 of every file above, verified on load

Weights and state are safetensors plus JSON, never pickle. A checkpoint is written to a temporary
sibling directory, flushed, then renamed into place, so a crash leaves the previous one intact.
"""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file

from .files import fsync_path, sha256_file
from .config import ConfigError, ModelConfig, from_dict
from .heads import SequenceClassifier, TokenClassifier
from .lora import LoRAConfig, add_lora, is_lora_key, merge_lora
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
TIED_KEYS = ("lm_head.weight",)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or of an unknown format; the message says how to proceed."""


HEADS = {"classification": SequenceClassifier, "token_classification": TokenClassifier}
Head = SequenceClassifier | TokenClassifier


def save_checkpoint(directory: str | Path, model: GPT | Head, tokenizer: Tokenizer,
                    meta: dict | None = None, train_state: dict | None = None) -> Path:
    """Write a checkpoint atomically. ``train_state`` is any nested dict of tensors and JSON values
    (optimizer state dicts, RNG states, counters). A task head is stored beside the weights;
    unmerged LoRA adapters go to their own file."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        head = model if isinstance(model, (SequenceClassifier, TokenClassifier)) else None
        gpt = unwrap(head.gpt if head else model)
        state = {k: v.detach().contiguous().cpu() for k, v in gpt.state_dict().items() if k not in TIED_KEYS}
        adapter = {k: state.pop(k) for k in [k for k in state if is_lora_key(k)]}
        config = {"format_version": FORMAT_VERSION, "model": _asdict(gpt.config),
                  "tokenizer": tokenizer.save(tmp), "meta": meta or {}}
        if head is not None:
            state.update({k: v.detach().contiguous().cpu() for k, v in head.head_state().items()})
            config["head"] = head.head_config()
        if adapter:
            save_file(adapter, tmp / "adapter.safetensors", metadata={"format": "pt"})
            config["adapter"] = gpt.lora_config
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if train_state is not None:
            tensors, skeleton = split_tensors(train_state)
            save_file(tensors, tmp / "train_state.safetensors")
            (tmp / "train_state.json").write_text(json.dumps(skeleton))
        checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / "checksums.json").write_text(json.dumps(checksums, indent=2))
        for p in tmp.iterdir():
            fsync_path(p)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def recover_interrupted_save(target: Path) -> None:
    """Put back the previous checkpoint if a save was killed between moving it aside and renaming
    the new one into place (see replace_dir), so a resume finds it."""
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)


def replace_dir(new: Path, target: Path) -> None:
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
    sums_file = directory / "checksums.json"
    if not sums_file.exists():
        raise CheckpointError(f"{directory} is not a gptstack checkpoint (no checksums.json); "
                              "for a Hugging Face model directory use `gptstack import` first")
    try:
        checksums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{sums_file} is corrupted; restore the checkpoint from a copy") from None
    for name, expected in checksums.items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {directory} is missing {name}; restore it from a copy")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path} is corrupted or truncated (SHA-256 mismatch); "
                                  "restore it from a copy or use another checkpoint (e.g. best/ or last/)")
    config = json.loads((directory / "config.json").read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format {config.get('format_version')}, "
                              f"this gptstack reads format {FORMAT_VERSION}")
    return config


def model_config_of(directory: Path, config: dict) -> ModelConfig:
    try:
        return from_dict(ModelConfig, config["model"]).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/config.json has an invalid model config: {exc}") from None


def describe(directory: str | Path) -> tuple[ModelConfig, Tokenizer, dict]:
    """A checkpoint's model config, tokenizer and config.json without its weights: all that a
    process needs that routes requests but never runs the model (serve/replicas.py)."""
    directory = Path(directory)
    config = verify(directory)
    return model_config_of(directory, config), load_tokenizer(config["tokenizer"], base_dir=directory), config


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
    missing, _ = model.load_state_dict(load_weights(directory), strict=False, assign=True)
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing:
        raise CheckpointError(f"{directory}/model.safetensors lacks {sorted(missing)[:5]}...; it does not match its config")
    model.lm_head.weight = model.transformer.wte.weight
    if config.get("adapter"):
        add_lora(model, LoRAConfig(**config["adapter"]))
        missing, unexpected = model.load_state_dict(load_weights(directory, "adapter.safetensors"), strict=False,
                                                    assign=True)
        if unexpected or any(is_lora_key(k) for k in missing):
            raise CheckpointError(f"{directory}/adapter.safetensors does not match the adapter in its config.json")
    model.to(device=device, dtype=dtype)
    if config.get("adapter") and merge_adapter:
        merge_lora(model)
    tokenizer = load_tokenizer(config["tokenizer"], base_dir=directory)
    return model.eval(), tokenizer, config


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
    options = {"context": head["context"]} if head["kind"] == "token_classification" else {}
    module = HEADS[head["kind"]](model, head["labels"], **options)
    module.load_head_state(load_weights(directory))
    weight = model.transformer.wte.weight
    return module.to(device=weight.device, dtype=weight.dtype).eval()


def load_weights(directory: str | Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    try:
        return load_file(Path(directory) / name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {directory}/model.safetensors: {exc}") from None


def load_train_state(directory: str | Path) -> dict | None:
    directory = Path(directory)
    if not (directory / "train_state.json").exists():
        return None
    skeleton = json.loads((directory / "train_state.json").read_text())
    return join_tensors(load_file(directory / "train_state.safetensors"), skeleton)


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
    import torch.distributed.checkpoint as dcp
    model_cfg = from_dict(ModelConfig, config["model"]).validate()
    with torch.device("meta"):
        model = GPT(model_cfg)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    state = {"model": model.state_dict()}   # views of the model's own tensors: DCP fills them in place
    try:
        with quietly_in_one_process():
            dcp.load(state, checkpoint_id=Path(directory), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"{directory} does not hold a {model_cfg.n_layer}-layer GPT as its config says: "
                              f"{str(exc).splitlines()[0]}") from None
    return model, load_tokenizer(config["tokenizer"], base_dir=directory)
