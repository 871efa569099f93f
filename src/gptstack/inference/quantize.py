"""The serving weights: every matmul of the transformer blocks and the LM head in fp32, bf16, int8 or int4.

:func:`prepare_weights` fuses q, k and v into one matmul first (fused.py), then swaps each linear
layer for a :class:`~gptstack.inference.kernels.DecodeLinear` holding its weight in the chosen
format: on the CPU packed for our decode kernels (kernels.py), elsewhere (CUDA) as PyTorch tensors
dequantized into the activations' dtype per call. int8 is weight-only with one scale per output
channel; int4 has one scale per 32 inputs (llama.cpp's q4_0). Activations stay in the model's dtype.
The token embedding keeps its precision for lookups; the LM head gets its own copy in the format.

On the CPU the layers are then calibrated: each shape times its paths (kernel, ``F.linear``, ...)
at a few batch sizes and keeps the fastest per size; the report goes to the ``gptstack.kernels`` log.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..model import GPT
from .fused import fuse_qkv
from .kernels import FORMATS, DecodeLinear, calibrate

log = logging.getLogger("gptstack.kernels")


def prepare_weights(model: GPT, weights: str, calibrate_paths: bool = True) -> GPT:
    """Put the model's matmul weights in ``weights`` (one of fp32, bf16, int8, int4) in place, for
    inference only; returns the model. ``calibrate_paths``: measure each layer's paths by batch size
    (CPU, a few seconds for GPT-2 124M); otherwise the kernels take every batch size."""
    if weights not in FORMATS:
        raise ValueError(f"weights must be one of {', '.join(FORMATS)}, got {weights!r}")
    model = fuse_qkv(model.eval())
    for block in model.transformer.h:
        for layer in (block.attn, block.mlp):
            for name, child in list(layer.named_children()):
                if type(child) is nn.Linear:     # LoRA layers kept apart stay as they are
                    setattr(layer, name, DecodeLinear(child, weights))
    model.lm_head = DecodeLinear(model.lm_head, weights)     # its own copy: the embedding stays as it is
    if calibrate_paths and model.lm_head.weight.device.type == "cpu":
        log.info("%s", calibrate(model))
    return model


def prepare_for_decoding(model: GPT, quantize: str = "none") -> GPT:
    """The weights ``gptstack serve`` and ``generate`` decode with: ``quantize`` (int8, int4) if
    asked; otherwise, on the CPU, the model's own dtype through our kernels (they stream weights at
    about the memory bandwidth where PyTorch's kernels reach less than half of it); elsewhere the
    model as it is."""
    if quantize != "none":
        return prepare_weights(model, quantize)
    dtype = model.lm_head.weight.dtype
    if model.lm_head.weight.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        return prepare_weights(model, "fp32" if dtype == torch.float32 else "bf16")
    return model


def quantize_int8(model: GPT) -> GPT:
    """int8 weight-only quantization in place (see :func:`prepare_weights`)."""
    return prepare_weights(model, "int8")


def quantize_int4(model: GPT) -> GPT:
    """int4 weight-only quantization in place, one scale per 32 inputs (see :func:`prepare_weights`)."""
    return prepare_weights(model, "int4")
