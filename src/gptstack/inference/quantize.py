"""int8 weight-only quantization for serving.

Every matmul weight of the transformer blocks and the LM head is stored as int8 with one scale per
output channel (symmetric, absmax / 127); activations stay in the compute dtype. Weights take a
quarter of fp32's memory, and decoding, which is memory-bound, reads a quarter of the bytes.
The token embedding keeps its precision for lookups; the LM head gets its own int8 copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.device.type == "cpu" and flat.dtype == torch.float32:
            out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        else:
            out = F.linear(flat, self.weight.to(flat.dtype)) * self.scale.to(flat.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*shape[:-1], self.out_features)


def quantize_int8(model: GPT) -> GPT:
    """Replace the model's matmul weights by int8 in place; returns the model (inference only)."""
    for block in model.transformer.h:
        block.attn.c_attn = Int8Linear(block.attn.c_attn)
        block.attn.c_proj = Int8Linear(block.attn.c_proj)
        block.mlp.c_fc = Int8Linear(block.mlp.c_fc)
        block.mlp.c_proj = Int8Linear(block.mlp.c_proj)
    model.lm_head = Int8Linear(model.lm_head)
    return model.eval()
