"""LoRA (Hu et al. 2021): low-rank adapters on the GPT's linear projections.

A wrapped projection computes ``x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with the base ``W``
frozen, ``A`` [r, in] initialised like a linear layer and ``B`` [out, r] at zero, so training
starts from exactly the base model. ``merge_lora`` folds ``(alpha / r) B A`` into ``W`` and puts
plain ``nn.Linear`` layers back: a merged model is an ordinary GPT, as fast as the base.

The wrapper keeps the base layer's parameter names (``...q_proj.weight``) and adds
``...q_proj.lora_A`` / ``lora_B``, so base weights load into a wrapped model unchanged and adapter
weights can be saved on their own. Written here rather than taken from PEFT: PEFT would add
transformers and accelerate as run-time dependencies and its own save format, for what is fifty
lines on a model whose projections are plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import QKV_PROJECTIONS

# The GPT's projections by their module names: attention in (q, k, v) and out, MLP up and down.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn.c_proj", "c_fc", "mlp.c_proj")
# c_attn, one projection for q, k and v until they were split, still names the three (model.split_fused_qkv).
LORA_ALIASES = {"c_attn": QKV_PROJECTIONS}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoRAConfig":
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS and t not in LORA_ALIASES]
        if unknown or not self.targets:
            raise ValueError(f"lora targets {unknown or '[]'} are not projections of this model; "
                             f"choose from {list(LORA_TARGETS)} (c_attn: q_proj, k_proj and v_proj)")
        return self

    def projections(self) -> list[str]:
        """The targets with aliases resolved, each once."""
        return list(dict.fromkeys(name for t in self.targets for name in LORA_ALIASES.get(t, (t,))))


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` that shares a base layer's weight and bias and adds a trainable low-rank term."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = cfg.scale
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain linear layer whose weight is W + scale * B A."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            plain.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def _targeted(model: nn.Module, targets: list[str]):
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap the targeted projections of ``model`` in place and freeze everything else;
    ``model.lora_config`` records the adapter's shape for checkpoints, targets by their current names."""
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(_targeted(model, cfg.projections())):
        _replace(model, name, LoRALinear(module, cfg))
    model.lora_config = asdict(replace(cfg, targets=cfg.projections()))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the model is a plain GPT again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def is_lora_key(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B")
