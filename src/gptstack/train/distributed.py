"""Process-group set-up for data-parallel training under torchrun (gloo on CPU, nccl on GPU).

Run ``torchrun --nproc_per_node N -m gptstack.cli train ...``; torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and this module turns them into a process group and a device. Without them training
runs as a single process. See docs/distributed.md for multi-node command lines.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dp_rank: int = 0        # this process's place among the data-parallel ones (see parallel.Layout)
    dp_size: int = 1        # processes that each take their own share of a batch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, device, dp_rank=rank, dp_size=world_size)


def sum_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return sum_across_ranks(value, info) / info.world_size


def max_across_ranks(value: float, info: DistInfo) -> float:
    """The largest of every rank's ``value``: one number all ranks agree on."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Destroy every process group while the interpreter is whole: after a barrier (no peer still in a
    collective) and a garbage collection (no finished gloo work left holding tensors), since gloo
    threads tearing those down during interpreter shutdown abort the process. Only for a run that
    finished: after a failure the peers may never reach the barrier (torchrun stops them all)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


@contextmanager
def process_group(device_name: str) -> Iterator[DistInfo]:
    """This process's place in the run (set up from torchrun's variables), torn down when it finishes."""
    info = setup(device_name)
    yield info
    teardown(info)
