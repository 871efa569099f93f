"""q, k and v in one matmul, for inference.

The model keeps q, k and v as three projections, so that tensor parallelism can shard each by heads.
Decoding one token reads every weight once per step, and three [C, C] matmuls cost three kernel calls
(and with int8, three activation quantizations) where one [3C, C] matmul costs one: at batch 1, GPT-2
124M on this project's CPU, 3% more CPU time per token in bf16 and 4% in int8 (fp32: within 1%).
The engine fuses them when it takes a model; ``quantize_int8`` fuses before it quantizes, so the
int8 kernels get the fused weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPT, QKV_PROJECTIONS, CausalSelfAttention


class FusedQKVAttention(CausalSelfAttention):
    """A :class:`CausalSelfAttention` whose q, k and v come from one linear layer, ``qkv_proj``
    (rows q; k; v). Made from a trained module by :func:`fuse_qkv`, never trained."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(x).chunk(3, dim=-1)


def fuse_qkv(model: GPT) -> GPT:
    """Fuse each attention's q, k and v projections in place; returns the model. Projections that
    are not plain linear layers (LoRA adapters kept apart, already quantized ones) stay as they are."""
    for block in model.transformer.h:
        attn = block.attn
        if type(attn) is not CausalSelfAttention:
            continue
        projections = [getattr(attn, name) for name in QKV_PROJECTIONS]
        if any(type(p) is not nn.Linear for p in projections):
            continue
        weight = projections[0].weight
        fused = nn.Linear(weight.shape[1], sum(p.out_features for p in projections), device=weight.device,
                          dtype=weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in projections]))
            fused.bias.copy_(torch.cat([p.bias for p in projections]))
        for name in QKV_PROJECTIONS:
            delattr(attn, name)
        attn.qkv_proj = fused
        attn.__class__ = FusedQKVAttention   # the same module otherwise: c_proj, dropout, band and layer stay
    return model
