"""int8 quantization of the matmul weights for serving.

Every matmul weight of the transformer blocks and the LM head becomes int8 with one scale per
output channel (symmetric), q, k and v fused into one matmul first (fused.py). The token embedding
keeps its precision for lookups; the LM head gets its own int8 copy.

- On CPU, PyTorch's dynamic quantization (fbgemm / onednn kernels) also quantizes each matmul's
  activations on the fly, so the matmul itself runs in int8: measured 5.8x the fp32 decode rate of
  GPT-2 124M on this project's 2-core AVX-512 machine (docs/benchmarks.md).
- Elsewhere (CUDA), :class:`Int8Linear` keeps weights in int8 and dequantizes them into the
  compute dtype per call: a quarter of the weight memory, activations untouched.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT
from .fused import fuse_qkv


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer (per-output-channel absmax scales)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def _untie_head(model: GPT) -> None:
    head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False,
                     device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    model.lm_head = head


def quantize_int8(model: GPT) -> GPT:
    """Quantize the model's matmul weights to int8 in place; returns the model (inference only)."""
    model = fuse_qkv(model.eval())
    _untie_head(model)
    if model.lm_head.weight.device.type == "cpu":
        if model.lm_head.weight.dtype != torch.float32:
            raise ValueError("int8 on the CPU runs with fp32 activations; load the weights as fp32 (--dtype fp32)")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        with warnings.catch_warnings():   # torch.ao announces its move to torchao; the API is current in 2.x
            warnings.simplefilter("ignore")
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        return model
    for block in model.transformer.h:
        for layer in (block.attn, block.mlp):
            for name, child in list(layer.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(layer, name, Int8Linear(child))
    model.lm_head = Int8Linear(model.lm_head)
    return model
