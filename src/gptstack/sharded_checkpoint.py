"""Sharded checkpoints: PyTorch Distributed Checkpoint (DCP) directories that load at any layout.

Every process writes the shards it holds (FSDP2 / tensor-parallel DTensors, pipeline stages, or
DDP replicas, which DCP writes once), keyed by the full model's parameter names; a later run with
another process count or layout reads back just its own shards, and one process reads the whole
model (checkpoint.load_model accepts these directories, so ``serve``, ``generate`` and ``export`` do too).

Layout::

    DIR/.metadata, DIR/__R_0.distcp   DCP: "model" and, in last/, "optimizer" (keyed by parameter name)
    DIR/config.json                   as in checkpoint.py, plus "sharded": true
    DIR/train_state.json + .safetensors   optional: step, RNG per process, scaler (not sharded)
    DIR/encryption.json               only when encrypted: every other file, DCP's included, is then
                                      sealed as a whole (AES-256-GCM, see checkpoint.py and crypto.py)
    DIR/checksums.json                SHA-256 of every file as stored; each process hashes the shards it wrote

A save is written to a temporary sibling directory and renamed into place once every process has
finished and checksums.json is written, so a kill at any moment leaves the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .checkpoint import (FORMAT_VERSION, CheckpointError, CheckpointWriter, load_dcp, load_train_state, new_cipher,
                         quietly_in_one_process, staged_save, verify)
from .config import ModelConfig
from .crypto import SCOPE_BYTES, FileCipher, key_id
from .dcp_io import SealedFiles, dcp_failures_raised
from .files import sha256_file
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
                 meta: dict, optimizer: torch.optim.Optimizer | None = None, train_state: dict | None = None,
                 encrypt: bool = False) -> Path:
    """Write ``model`` (this process's part of it) and optionally its optimizer. Collective: every
    process calls it; ``train_state`` is used from rank 0. ``encrypt``: seal every file with the key
    from the environment."""
    from dataclasses import asdict
    directory = Path(directory)
    rank = dist.get_rank() if _distributed() else 0
    cipher = agreed_cipher(directory) if encrypt else None
    with staged_save(directory) if rank == 0 else nullcontext() as staging:
        tmp = Path(_everyone(staging and str(staging))[0])
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=BY_NAME)
        writer = dcp.FileSystemWriter(tmp, sync_files=False)   # CheckpointWriter.finish flushes every file
        if cipher is not None:
            writer.fs = SealedFiles(seal=cipher.seal)
        with quietly_in_one_process(), dcp_failures_raised():
            dcp.save(state, storage_writer=writer, no_dist=not _distributed())
        mine = {p.name: sha256_file(p) for p in tmp.glob(f"__{rank}_*.distcp")}
        sums = {name: digest for part in _everyone(mine) for name, digest in part.items()}
        if rank == 0:
            files = CheckpointWriter(tmp, cipher)
            files.json("config.json", {"format_version": FORMAT_VERSION, "sharded": True, "model": asdict(model_cfg),
                                       "tokenizer": files.tokenizer(tokenizer), "meta": meta})
            if train_state is not None:
                files.train_state(train_state)
            files.finish(sums)
    if _distributed():
        dist.barrier()
    return directory


def agreed_cipher(directory: Path) -> FileCipher:
    """The cipher every process seals its files of ``directory`` with: its own key, which must be
    every other's, and rank 0's scope. Collective, and so is its failure: a process without the key
    (or with another one) makes every process raise, where raising alone would leave the others
    waiting for it in the save's next collective."""
    try:
        mine, problem = new_cipher(directory), None
    except CheckpointError as exc:
        mine, problem = None, str(exc)
    views = _everyone((os.urandom(SCOPE_BYTES), key_id(mine.key) if mine else None, problem))
    problems = [f"process {rank}: {problem}" for rank, (_, _, problem) in enumerate(views) if problem]
    if problems:
        raise CheckpointError("; ".join(problems))
    if len({key for _, key, _ in views}) > 1:
        raise CheckpointError(f"cannot write {directory} encrypted: the processes were given different keys "
                              f"(key ids {sorted({key for _, key, _ in views})}); give them all the same one")
    return dataclasses.replace(mine, scope=views[0][0])


def load_sharded(directory: str | Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Fill ``model`` (this process's part, at whatever layout) and optionally ``optimizer`` from a
    sharded checkpoint; returns its train state ({} if it has none)."""
    directory = Path(directory)
    verify(directory)
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=BY_NAME)
    load_dcp(state, directory, f"{directory} does not fit this model", no_dist=not _distributed())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=BY_NAME)
    return load_train_state(directory) or {}
