"""Parallel layouts of one training run over a DeviceMesh, with PyTorch's own engines.

Processes form a mesh of pipeline x data x tensor parallel degrees (tensor innermost, so on GPUs a
tensor-parallel group shares a machine's fast links):

- data parallel: DDP (the loop's plain path: every process holds the whole model), or FSDP2
  ``fully_shard`` (each block's parameters, gradients and optimizer state sharded over the
  data-parallel processes, gathered for the block's forward and backward; bf16/fp32 mixed
  precision policy; optional CPU offload). Combined with tensor or pipeline parallelism, data
  parallelism is FSDP2.
- tensor parallel: Megatron-LM's split through DTensor ``parallelize_module``: q, k, v and the MLP's
  first layer split by columns (each process computes whole heads and a slice of the hidden
  layer), the two output projections by rows, so each block costs two all-reduces forward and two
  backward. Embeddings, LayerNorms and the tied LM head stay replicated.
- pipeline parallel: ``torch.distributed.pipelining``: each process holds consecutive layers (the
  first stage the embeddings, the last the final LayerNorm, the LM head and the loss) and runs the
  step's micro-batches through a 1F1B or GPipe schedule. GPT ties the LM head to the token
  embedding, so first and last stage each hold a copy and sum their gradients, as Megatron-LM does.

A sharded model is built on the meta device and only each process's shard is allocated, then
filled with :func:`gptstack.model.initial_value`, the values the single-process model would hold.
Stages keep the full model's parameter names, so Distributed Checkpoint loads a checkpoint at any
layout (sharded_checkpoint.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..config import ConfigError, ModelConfig, TrainConfig
from ..loss import linear_cross_entropy
from ..model import GPT, initial_value
from . import distributed


@dataclass
class Layout:
    """The degrees of each parallelism and this process's place in them."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    fsdp: bool = False
    mesh: DeviceMesh | None = None
    dp_rank: int = 0
    pp_rank: int = 0

    @classmethod
    def create(cls, cfg: TrainConfig, info: distributed.DistInfo) -> "Layout":
        tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
        if info.world_size % (tp * pp):
            raise ConfigError(f"{info.world_size} processes cannot be split into tensor_parallel {tp} x "
                              f"pipeline_parallel {pp} groups: start a multiple of {tp * pp} processes")
        dp = info.world_size // (tp * pp)
        layout = cls(dp, tp, pp, cfg.fsdp)
        if not layout.sharded or info.world_size == 1:   # one process holds everything whatever the settings
            return cls(dp=info.world_size, dp_rank=info.rank)
        if dp > 1 and (tp > 1 or pp > 1) and not cfg.fsdp:
            raise ConfigError(f"{dp} data-parallel groups of tensor/pipeline-parallel processes need FSDP2: "
                              "set fsdp: true (or start tensor_parallel x pipeline_parallel processes)")
        if cfg.cpu_offload and info.device.type != "cuda":
            raise ConfigError("cpu_offload moves GPU memory to the host; training here already runs on the CPU: "
                              "leave cpu_offload unset")
        layout.mesh = init_device_mesh(info.device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        layout.dp_rank, layout.pp_rank = layout.mesh["dp"].get_local_rank(), layout.mesh["pp"].get_local_rank()
        return layout

    @property
    def sharded(self) -> bool:
        """Whether parameters are DTensors (FSDP2, tensor or pipeline parallel) rather than DDP replicas."""
        return self.fsdp or self.tp > 1 or self.pp > 1

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        data = f"data {self.dp} ({'FSDP2' if self.fsdp else 'DDP'})"
        return " x ".join([data] + [f"tensor {self.tp}"] * (self.tp > 1) + [f"pipeline {self.pp}"] * (self.pp > 1))

    def as_dict(self) -> dict:
        return {"data_parallel": self.dp, "fsdp": self.fsdp, "tensor_parallel": self.tp, "pipeline_parallel": self.pp}


# --- building a sharded model ---------------------------------------------------------------------

class PipelineStageModel(nn.Module):
    """Layers ``layers`` of a GPT for one pipeline stage, under the full model's parameter names.

    The first stage embeds token ids; the last applies the final LayerNorm and returns hidden states,
    which the schedule's loss function turns into the loss with the (tied) LM head."""

    def __init__(self, gpt: GPT, layers: range, first: bool, last: bool):
        super().__init__()
        self.config, self.first, self.last = gpt.config, first, last
        self.activation_checkpointing = False
        parts = {"h": nn.ModuleDict({str(i): gpt.transformer.h[i] for i in layers})}
        if first or last:
            parts["wte"] = gpt.transformer.wte
        if first:
            parts.update(wpe=gpt.transformer.wpe, drop=gpt.transformer.drop)
        if last:
            parts["ln_f"] = gpt.transformer.ln_f
        self.transformer = nn.ModuleDict(parts)
        if last:
            self.lm_head = gpt.lm_head   # tied to wte, which this stage also holds, and named after it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.transformer.drop(self.transformer.wte(x) + self.transformer.wpe(positions))
        for block in self.transformer.h.values():
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.transformer.ln_f(x) if self.last else x


def stage_layers(n_layer: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage ``stage``: consecutive, as even as the division allows."""
    bounds = [round(i * n_layer / pp) for i in range(pp + 1)]
    return range(bounds[stage], bounds[stage + 1])


def tensor_parallel_plan() -> dict:
    """Megatron-LM's split of a block: column-parallel q/k/v and MLP input, row-parallel outputs."""
    return {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}


def build_model(model_cfg: ModelConfig, cfg: TrainConfig, layout: Layout, device: torch.device,
                dtype: torch.dtype, init_seed: int) -> nn.Module:
    """This process's part of the model, sharded by ``layout`` and initialised: a GPT, or under
    pipeline parallelism this stage's :class:`PipelineStageModel`. Only the shards are allocated."""
    with torch.device("meta"):
        model: nn.Module = GPT(model_cfg)
    if layout.pp > 1:
        model = PipelineStageModel(model, stage_layers(model_cfg.n_layer, layout.pp, layout.pp_rank),
                                   layout.first_stage, layout.last_stage)
    blocks = list(model.transformer.h.values() if layout.pp > 1 else model.transformer.h)
    if layout.tp > 1:
        for block in blocks:
            parallelize_module(block, layout.mesh["tp"], tensor_parallel_plan())
    if cfg.compile:
        for block in blocks:
            block.compile()
    if layout.fsdp:
        low_precision = dtype if dtype in (torch.bfloat16, torch.float16) else None
        options = dict(mesh=layout.mesh["dp"],
                       mp_policy=MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32),
                       offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy())
        for block in blocks:   # a pipeline stage keeps its blocks gathered across its micro-batches
            fully_shard(block, reshard_after_forward=layout.pp == 1, **options)
        fully_shard(model, **options)
    model.to_empty(device=device)
    if hasattr(model, "lm_head") and model.lm_head.weight is not model.transformer.wte.weight:
        model.lm_head.weight = model.transformer.wte.weight   # to_empty gave each name its own tensor
    fill_initial_values(model, model_cfg, init_seed)
    return model


def fill_initial_values(model: nn.Module, model_cfg: ModelConfig, seed: int) -> None:
    """Each parameter this process holds set to the single-process model's initial value, drawn
    whole on the CPU one parameter at a time."""
    with torch.device("meta"):
        index = {name: i for i, (name, _) in enumerate(GPT(model_cfg).named_parameters())}
    fill_parameters(model, lambda name: initial_value(model_cfg, name, model.get_parameter(name).shape,
                                                      seed, index[name]))


def fill_parameters(model: nn.Module, value_of) -> None:
    """Set each parameter this process holds (all of it, or its shard) from ``value_of(name)``,
    the whole value; this process keeps its shard of it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = value_of(name).to(param.device, param.dtype)
            if isinstance(param, DTensor):
                param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                         src_data_rank=None).to_local())
            else:
                param.copy_(full)


# --- the step -------------------------------------------------------------------------------------

@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across data-parallel processes only when ``enabled`` (the step's last
    micro-batch): DDP's no_sync, FSDP2's requires_gradient_sync."""
    if enabled:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


class Pipeline:
    """This stage's part of a pipelined step or evaluation: every process calls it with the same
    batch; the first stage feeds it in, the last computes the loss, and all get the mean loss."""

    def __init__(self, stage_model: PipelineStageModel, layout: Layout, cfg: TrainConfig, device: torch.device):
        self.model, self.layout, self.cfg, self.device = stage_model, layout, cfg, device
        self.group = layout.mesh["pp"].get_group()
        self.schedules: dict[tuple, object] = {}
        self.tied_group = tied_embedding_group(layout)

    def _schedule(self, micro_batches: int, shape: torch.Size):
        """A stage and schedule per batch shape: a stage fixes its activation shapes on first use."""
        key = (micro_batches, tuple(shape))
        if key not in self.schedules:
            stage = PipelineStage(self.model, self.layout.pp_rank, self.layout.pp, self.device, group=self.group)
            kind = Schedule1F1B if self.cfg.pipeline_schedule == "1f1b" else ScheduleGPipe
            self.schedules[key] = kind(stage, micro_batches, loss_fn=self._loss)
        return self.schedules[key]

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.model.lm_head.weight, targets, self.cfg.label_smoothing)

    def run(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int, train: bool) -> torch.Tensor:
        """The mean loss over ``micro_batches`` equal slices of the batch (x, y); with ``train``
        the gradients too (scaled to the mean, and the tied embedding's summed over its two copies)."""
        schedule = self._schedule(micro_batches, x.shape)
        losses: list[torch.Tensor] = []
        run = schedule.step if train else schedule.eval
        inputs = (x,) if self.layout.first_stage else ()
        run(*inputs, target=y if self.layout.last_stage else None, losses=losses)
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.group)   # only the last stage had it
        if train and self.tied_group is not None:
            grad = self.model.transformer.wte.weight.grad
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)
        return loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[None, torch.Tensor]:
        """Evaluation with the model's call signature, for Task.evaluate."""
        return None, self.run(x, y, self.layout.pp, train=False)


def tied_embedding_group(layout: Layout):
    """The process group of this process's first- and last-stage peers (same data and tensor
    coordinates), which sum the gradients of the embedding both hold; None if not on either end."""
    ranks = layout.mesh.mesh   # [pp, dp, tp] global ranks
    mine = None
    for dp in range(layout.dp):   # every process creates every group, in the same order
        for tp in range(layout.tp):
            pair = [int(ranks[0, dp, tp]), int(ranks[-1, dp, tp])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
    return mine


def clip_gradients(model: nn.Module, max_norm: float, layout: Layout) -> torch.Tensor:
    """Clip the global gradient norm over every shard and stage; returns the norm before clipping.
    DTensor gradients on different meshes (FSDP2's, tensor parallel's) are normed mesh by mesh;
    under pipeline parallelism the stages' squares are summed, the tied embedding counted once."""
    by_mesh: dict = {}
    for name, param in model.named_parameters():
        if param.grad is None or (layout.pp > 1 and not layout.first_stage and name == "transformer.wte.weight"):
            continue
        key = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
        by_mesh.setdefault(key, []).append(param)
    squares = torch.zeros((), device=next(model.parameters()).device)
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        squares += (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    if layout.pp > 1:
        dist.all_reduce(squares, group=layout.mesh["pp"].get_group())
    total = squares.sqrt()
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    if layout.pp > 1 and not layout.first_stage and hasattr(model, "lm_head"):   # the tied copy left out above
        torch.nn.utils.clip_grads_with_norm_([model.lm_head.weight], max_norm, total)
    return total


# --- accounting -----------------------------------------------------------------------------------

def parameters_on_meta(model_cfg: ModelConfig, tp: int, pp: int) -> int:
    """Parameters one process of the first pipeline stage holds at tensor degree ``tp`` (before
    FSDP), counted on a model built on the meta device with this module's own stage split and
    tensor-parallel plan: nothing is allocated, so any size can be checked on a laptop."""
    with torch.device("meta"):
        model: nn.Module = GPT(model_cfg)
    if pp > 1:
        model = PipelineStageModel(model, stage_layers(model_cfg.n_layer, pp, 0), first=True, last=False)
    plan = tensor_parallel_plan()
    count = 0
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        style = next((style for key, style in plan.items() if module.endswith(key)), None)
        split = style is not None and (kind == "weight" or isinstance(style, ColwiseParallel))
        count += param.numel() // tp if split else param.numel()
    return count


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes of parameters, gradients and optimizer state this process holds (its shards only)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = {id(p): p for p in model.parameters()}.values()   # tied weights once
    counts = {"parameters": sum(local(p).nbytes for p in params),
              "gradients": sum(local(p.grad).nbytes for p in params if p.grad is not None),
              "optimizer": 0}
    if optimizer is not None:
        counts["optimizer"] = sum(local(v).nbytes for state in optimizer.state.values()
                                  for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return counts
