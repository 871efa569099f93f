"""A decode step's transformer as one C++ call (csrc/decode_stack.cpp), for steps in which every
sequence brings one token.

Run as PyTorch modules, a GPT-2 124M decode step is ~15 small ops per block from Python; measured
on this project's CPU that added ~3 ms to ~5 ms of matmuls per token. The stack takes the same
weights (the packed :class:`~gptstack.inference.kernels.DecodeLinear` layers, the LayerNorms, the
embeddings and the KV cache's pools, all shared, not copied) and runs embeddings, blocks and final
LayerNorm in one call; the engine then applies the LM head as before. The residual stream stays in
fp32 inside the stack, so in a bf16 model its hidden states are, if anything, closer to fp32's than
the modules' are.

:meth:`DecodeStack.of` says None when the model is not the plain prepared GPT the stack knows
(LoRA layers kept apart, weights not packed for the kernels, another device), and the engine then
runs every step through the model's modules.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from ..kv_cache import PagedBatch, PagedKVCache
from ..model import GPT, MLP, Block
from ..ops import library
from .fused import FusedQKVAttention
from .kernels import DecodeLinear

log = logging.getLogger("gptstack.engine")


class DecodeStack:
    def __init__(self, stack: torch.ScriptObject, max_rows: float):
        self._stack = stack
        self.max_rows = max_rows     # the most sequences a step may hold for the stack to run it

    @classmethod
    def of(cls, model: GPT, cache: PagedKVCache) -> "DecodeStack | None":
        """The stack over ``model``'s weights and ``cache``'s pools, or None (with the reason logged)
        when some part of the model is not one the stack runs."""
        reason = cls._unsupported(model, cache)
        if reason:
            log.info("decode steps run through the model's modules: %s", reason)
            return None
        t = model.transformer
        stack = torch.classes.gptstack.DecodeStack(t.wte.weight.detach(), t.wpe.weight.detach(), t.ln_f.weight.detach(),
                                                   t.ln_f.bias.detach(), t.ln_f.eps, model.config.n_head,
                                                   t.h[0].mlp.gelu.approximate)
        max_rows = math.inf
        for block, k_pool, v_pool in zip(t.h, cache.k, cache.v):
            linears = [block.attn.qkv_proj, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
            stack.add_block([block.ln_1.weight.detach(), block.ln_1.bias.detach(), block.ln_2.weight.detach(),
                             block.ln_2.bias.detach()],
                            [layer.format for layer in linears], [layer.weight for layer in linears],
                            [layer.scales if layer.scales is not None else torch.empty(0) for layer in linears],
                            [layer.bias for layer in linears], [layer.in_features for layer in linears],
                            [layer.out_features for layer in linears], block.attn.band_width or 0, k_pool, v_pool)
            max_rows = min([max_rows] + [kernel_rows(layer) for layer in linears])
        return cls(stack, max_rows)

    @staticmethod
    def _unsupported(model: GPT, cache: PagedKVCache) -> str | None:
        if library is None:
            return "the gptstack kernels are not built"
        t = model.transformer
        if t.wte.weight.device.type != "cpu" or t.wte.weight.dtype not in (torch.float32, torch.bfloat16):
            return "the model is not fp32 or bf16 on the CPU"
        if cache.k[0].dtype != t.wte.weight.dtype:
            return "the KV cache's dtype is not the model's"
        for i, block in enumerate(t.h):
            parts = [type(block) is Block, type(block.attn) is FusedQKVAttention, type(block.mlp) is MLP,
                     all(type(norm) is nn.LayerNorm and norm.bias is not None for norm in (block.ln_1, block.ln_2)),
                     type(block.mlp.gelu) is nn.GELU]
            if not all(parts):
                return f"block {i} is not a plain GPT block"
            for layer in (getattr(block.attn, "qkv_proj", None), block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                if not (isinstance(layer, DecodeLinear) and layer.packed and layer.bias is not None):
                    return f"block {i} has a linear layer not packed for the kernels (prepare_weights packs them)"
                if kernel_rows(layer) == 0:
                    return f"block {i} has a layer whose calibrated plan never takes the kernels"
        if type(t.ln_f) is not nn.LayerNorm or t.ln_f.bias is None:
            return "the final LayerNorm is not a plain one"
        return None

    def __call__(self, tokens: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """Hidden states [M, n_embd] of a flat batch of M one-token sequences (``tokens`` [M])."""
        decodes = batch.groups[0]
        return self._stack.forward(tokens, batch.positions[0], batch.write_slots, decodes["key_slots"],
                                   decodes["key_lengths"])


def kernel_rows(layer: DecodeLinear) -> float:
    """The most rows for which ``layer``'s calibrated plan takes the kernels all the way from one row."""
    rows = 0
    for largest, path in layer.plan:
        if path != "kernel":
            break
        rows = largest
    return rows
