"""Optimizer and schedules: AdamW with decay on matrices only, warmup + decay, batch ramp-up."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam(W) where weight decay touches only 2-D weights (matmuls and embeddings), as in GPT-3;
    biases and LayerNorm gains are not decayed. ``optimizer: adamw`` decays the weights directly
    (decoupled, Loshchilov & Hutter); ``adam`` adds ``weight_decay * w`` to the gradient (L2), which
    Adam then rescales. Uses the fused kernel where this torch has one; a sharded model's parameters
    are grouped by the device mesh they are spread over, as one kernel call takes one mesh."""
    groups: dict[tuple, dict] = {}
    for p in model.parameters():
        if p.requires_grad:
            decay = cfg.weight_decay if p.dim() >= 2 else 0.0
            key = (decay, id(getattr(p, "device_mesh", None)))
            groups.setdefault(key, {"params": [], "weight_decay": decay})["params"].append(p)
    groups = list(groups.values())
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=cfg.peak_learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                fused=device.type in ("cuda", "cpu"))


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to the peak rate, then cosine/linear decay to ``min_lr_ratio`` of it."""
    peak = cfg.peak_learning_rate
    floor = peak * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return peak
    decay_end = cfg.lr_decay_steps or total_steps
    if step >= decay_end:
        return floor
    progress = (step - cfg.warmup_steps) / max(1, decay_end - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1 - progress
    return floor + (peak - floor) * shape


def micro_batches(step: int, cfg: TrainConfig) -> int:
    """Micro-batches accumulated at ``step``: GPT-3's batch ramp-up grows the batch linearly from
    ``batch_rampup_start`` to ``grad_accum_steps`` micro-batches over ``batch_rampup_steps``."""
    if cfg.batch_rampup_steps == 0 or step >= cfg.batch_rampup_steps:
        return cfg.grad_accum_steps
    start = min(cfg.batch_rampup_start, cfg.grad_accum_steps)
    return start + (cfg.grad_accum_steps - start) * step // cfg.batch_rampup_steps


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                  scaler: torch.amp.GradScaler, clip: Callable[[torch.nn.Module, float], torch.Tensor] | None = None
                  ) -> torch.Tensor | None:
    """Unscale (fp16), clip the global gradient norm (with ``clip(model, max_norm)`` for a sharded
    model), step and clear the gradients; returns the norm before clipping (None without clipping),
    still on the device so nothing waits for it."""
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        if clip is not None:
            grad_norm = clip(model, grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
