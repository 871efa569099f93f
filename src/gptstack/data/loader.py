"""Fixed-length training windows from prepared shards.

Every batch is a pure function of (seed, step): the rows of step ``s`` are drawn by a generator
seeded with ``[seed, s]``. So resuming needs only the step number, and distributed ranks each take
their own slice of the same global batch, with no overlap and no communication: rank ``r`` at
micro-step ``m`` takes block ``m * world_size + r`` of the global batch. A single process with the
same global batch sees exactly the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..files import sha256_file
from .prepare import MANIFEST, DataError


class TokenDataset:
    """One split ("train" or "val") of a prepared dataset, memory-mapped."""

    def __init__(self, directory: str | Path, split: str = "train", verify: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.directory} has no {split!r} split")
        self.split = split
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.directory / shard["file"]
            if not path.exists() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"shard {path} is missing or truncated; run `gptstack prepare` again")
            if verify and sha256_file(path) != shard["sha256"]:
                raise DataError(f"shard {path} does not match its checksum; run `gptstack prepare` again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.num_tokens = sum(len(s) for s in self.shards)

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def window_starts(self, block_size: int) -> np.ndarray:
        """How many windows of block_size + 1 tokens each shard can hold."""
        counts = np.array([max(0, len(s) - block_size) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise DataError(f"the {self.split} split of {self.directory} has {self.num_tokens} tokens, fewer than "
                            f"one window of {block_size + 1}; add text or lower block_size")
        return counts

    def windows(self, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for global window indices ``starts``."""
        counts = self.window_starts(block_size)
        bounds = np.cumsum(counts)
        shard_ids = np.searchsorted(bounds, starts, side="right")
        offsets = starts - np.concatenate([[0], bounds[:-1]])[shard_ids]
        rows = np.stack([self.shards[s][o:o + block_size + 1] for s, o in zip(shard_ids, offsets)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise DataError(f"{directory} is not a prepared dataset (no {MANIFEST}); run `gptstack prepare` on your text first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupted ({exc}); run `gptstack prepare` again") from None


class BatchSampler:
    """Random training windows, deterministic from (seed, step), sharded across ranks."""

    def __init__(self, dataset: TokenDataset, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.dataset, self.block_size, self.batch_size = dataset, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.total_windows = int(dataset.window_starts(block_size).sum())

    def micro_batch(self, step: int, micro: int, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows for micro-step ``micro`` of ``n_micro`` at optimizer step ``step``."""
        global_rows = n_micro * self.world_size * self.batch_size
        starts = np.random.default_rng([self.seed, step]).integers(0, self.total_windows, size=global_rows)
        block = micro * self.world_size + self.rank
        return self.dataset.windows(starts[block * self.batch_size:(block + 1) * self.batch_size], self.block_size)


def eval_batches(dataset: TokenDataset, block_size: int, batch_size: int, n_batches: int,
                 rank: int = 0, world_size: int = 1):
    """The same evenly spaced windows at every evaluation, so val losses compare across steps;
    ranks take interleaved batches."""
    total = int(dataset.window_starts(block_size).sum())
    n_rows = min(n_batches * batch_size, total)
    starts = np.linspace(0, total - 1, n_rows).astype(np.int64)
    for b in range(rank, -(-n_rows // batch_size), world_size):
        yield dataset.windows(starts[b * batch_size:(b + 1) * batch_size], block_size)
