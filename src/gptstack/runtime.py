"""Device and precision chosen at run time, so the same code runs on a laptop CPU and on CUDA."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return device


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls have hardware support (CUDA Ampere+, or a CPU with AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for 'auto' | 'fp32' | 'bf16' | 'fp16' on this device."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device (it relies on a gradient scaler and fp16 tensor cores); use bf16 on CPU")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for ``dtype``; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def tune_allocator() -> None:
    """Keep large CPU tensors in the heap instead of mmap-ing and zero-faulting them each step.

    glibc serves allocations over 32 MiB (the embedding's gradient, the bf16 copy of a 50k-token
    LM head, loss chunks) with fresh mmaps, so every training step page-faults through gigabytes:
    measured on the demo model, 300k page faults and 0.6 s of kernel time per step. Raising the
    mmap and trim thresholds lets freed blocks be reused: 1.7x more tokens/s. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass
