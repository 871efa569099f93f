"""Sharded checkpoints: PyTorch Distributed Checkpoint (DCP) directories that load at any layout.

Every process writes the shards it holds (FSDP2 / tensor-parallel DTensors, pipeline stages, or
DDP replicas, which DCP writes once), keyed by the full model's parameter names; a later run with
another process count or layout reads back just its own shards, and one process reads the whole
model (checkpoint.load_model accepts these directories, so ``serve``, ``generate`` and ``export`` do too).

Layout::

    DIR/.metadata, DIR/__R_0.distcp   DCP: "model" and, in last/, "optimizer" (keyed by parameter name)
    DIR/config.json                   as in checkpoint.py, plus "sharded": true
    DIR/train_state.json + .safetensors   optional: step, RNG per process, scaler (not sharded)
    DIR/checksums.json                SHA-256 of every file; each process hashes the shards it wrote

A save is written to a temporary sibling directory and renamed into place once every process has
finished and checksums.json is written, so a kill at any moment leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from safetensors.torch import load_file, save_file

from .checkpoint import (FORMAT_VERSION, CheckpointError, join_tensors, quietly_in_one_process, replace_dir,
                         split_tensors, verify)
from .config import ModelConfig
from .files import fsync_path, sha256_file
from .tokenizer import Tokenizer


# Optimizer state keyed by parameter name, param groups included: the groups differ between layouts
# (build_optimizer groups parameters by device mesh), the names do not.
BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _everyone(obj):
    """Every process's ``obj``, in rank order."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_sharded(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, model_cfg: ModelConfig,
                 meta: dict, optimizer: torch.optim.Optimizer | None = None, train_state: dict | None = None) -> Path:
    """Write ``model`` (this process's part of it) and optionally its optimizer. Collective: every
    process calls it; ``train_state`` is used from rank 0."""
    from dataclasses import asdict
    directory = Path(directory)
    rank = dist.get_rank() if _distributed() else 0
    tmp = None
    if rank == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        for stale in directory.parent.glob(f".{directory.name}.*"):   # left by a save that was killed
            if stale.is_dir() and stale.name != f".{directory.name}.old":
                shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent)
    tmp = Path(_everyone(tmp)[0])
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=BY_NAME)
    with quietly_in_one_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
    mine = {p.name: sha256_file(p) for p in tmp.glob(f"__{rank}_*.distcp")}
    sums = {name: digest for part in _everyone(mine) for name, digest in part.items()}
    if rank == 0:
        config = {"format_version": FORMAT_VERSION, "sharded": True, "model": asdict(model_cfg),
                  "tokenizer": tokenizer.save(tmp), "meta": meta}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if train_state is not None:
            tensors, skeleton = split_tensors(train_state)
            save_file(tensors, tmp / "train_state.safetensors")
            (tmp / "train_state.json").write_text(json.dumps(skeleton))
        sums.update({p.name: sha256_file(p) for p in tmp.iterdir() if p.name not in sums})
        (tmp / "checksums.json").write_text(json.dumps(dict(sorted(sums.items())), indent=2))
        for p in tmp.iterdir():
            fsync_path(p)
        replace_dir(tmp, directory)
    if _distributed():
        dist.barrier()
    return directory


def load_sharded(directory: str | Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Fill ``model`` (this process's part, at whatever layout) and optionally ``optimizer`` from a
    sharded checkpoint; returns its train state ({} if it has none)."""
    directory = Path(directory)
    verify(directory)
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=BY_NAME)
    try:
        with quietly_in_one_process():
            dcp.load(state, checkpoint_id=directory, no_dist=not _distributed())
    except Exception as exc:   # DCP reports a shape or key mismatch as a generic exception
        raise CheckpointError(f"{directory} does not fit this model: {str(exc).splitlines()[0]}") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=BY_NAME)
    if not (directory / "train_state.json").exists():
        return {}
    skeleton = json.loads((directory / "train_state.json").read_text())
    return join_tensors(load_file(directory / "train_state.safetensors"), skeleton)
