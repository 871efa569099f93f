"""The C++ ops (csrc/, built as ``gptstack._kernels``), loaded in this one place, and the model
layer's own op with its PyTorch fallback.

Loading the library registers ``torch.ops.gptstack.*``: the decode matmuls, which
inference/kernels.py wraps, and paged decode attention, which the KV cache (kv_cache.py) calls. This
module sits before the model in the layer order so that the model layer can use the library
without importing the inference layer. ``GPTSTACK_KERNEL_ISA`` caps the instruction set of every
kernel (see inference/kernels.py). Without the library (a build without torch) ``library`` is None
and the ops run as PyTorch code.
"""

from __future__ import annotations

import os

import torch

try:
    from . import _kernels  # noqa: F401  (loading the library registers torch.ops.gptstack.*)
    library = torch.ops.gptstack
except ImportError:
    library = None

if library is not None and os.environ.get("GPTSTACK_KERNEL_ISA"):
    library.select_isa(os.environ["GPTSTACK_KERNEL_ISA"])


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, key_slots: torch.Tensor,
                           key_lengths: torch.Tensor, band_width: int, scale: float) -> torch.Tensor:
    """Attention of one query per sequence over its keys in a paged pool. q [S, H, D]; pools
    [slots, H, D]; key l < key_lengths[s] of sequence s is in slot key_slots[s, l] ([S, L] int64);
    the query, at position key_lengths[s] - 1, sees the last ``band_width`` keys if band_width > 0,
    else all of them. Returns [S, H, D] in q's dtype.

    On CPU the C++ op reads the keys where they lie; elsewhere, or with other dtypes, the keys are
    gathered and attended with PyTorch ops (also the tests' oracle)."""
    if (library is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k_pool.dtype == v_pool.dtype == q.dtype):
        return library.paged_decode_attention(q, k_pool, v_pool, key_slots, key_lengths, band_width, scale)
    keys = k_pool[key_slots].transpose(1, 2).to(q.dtype)                   # [S, H, L, D]
    values = v_pool[key_slots].transpose(1, 2).to(q.dtype)
    position = torch.arange(key_slots.shape[1], device=q.device)
    seen = position < key_lengths[:, None]
    if band_width > 0:
        seen &= position >= key_lengths[:, None] - band_width
    scores = torch.matmul(q[:, :, None] * scale, keys.transpose(-1, -2))   # [S, H, 1, L]
    scores = scores.masked_fill(~seen[:, None, None], float("-inf"))
    return torch.matmul(scores.softmax(-1), values)[:, :, 0]
