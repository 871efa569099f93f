"""Device and precision chosen at run time, so the same code runs on a laptop CPU and on CUDA.

``dtype: auto`` must pick what is actually faster on the machine in hand, and that differs by
workload: a CPU with AVX512-BF16 but no AMX trains at ~0.6x fp32 under bf16 autocast while its
batch-1 decode gains from half the weight bytes; an AMX CPU wins both; an AVX2-only CPU neither.
So on a CPU with bf16 support ``auto`` times a short probe of the workload in fp32 and in bf16, once
per machine (cached by CPU model, flags, thread count and torch version), and logs what it chose
and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKLOADS = ("train", "inference")
# bf16 must beat fp32 by this factor to be chosen: fp32 is the safer numerics on a tie.
BF16_MARGIN = 1.1
log = logging.getLogger("gptstack.runtime")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return device


@dataclass
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def resolve_dtype(name: str, device: torch.device, workload: str = "inference") -> torch.dtype:
    """The compute dtype for 'auto' | 'fp32' | 'bf16' | 'fp16' on this device, for ``workload``
    ("train": autocast forward + backward; "inference": weights stored in the dtype, decode)."""
    if name == "auto":
        return choose_dtype(device, workload).dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device (it relies on a gradient scaler and fp16 tensor cores); use bf16 on CPU")
    return DTYPES[name]


def choose_dtype(device: torch.device, workload: str) -> DtypeChoice:
    """What ``auto`` means here, with the reason (logged at INFO)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        choice = DtypeChoice(torch.bfloat16 if supported else torch.float32,
                             f"CUDA device {'with' if supported else 'without'} bf16 support")
    elif device.type != "cpu" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        choice = DtypeChoice(torch.float32, f"{device.type}: no bf16 matmul units (AVX512-BF16 / AMX)")
    else:
        choice = faster_dtype(cpu_probe(workload), workload)
    log.info("dtype auto -> %s for %s: %s", dtype_name(choice.dtype), workload, choice.reason)
    return choice


def faster_dtype(timing: dict, workload: str) -> DtypeChoice:
    """The rule: bf16 when its probe ran at least BF16_MARGIN times faster than fp32's."""
    speedup = timing["fp32"] / timing["bf16"]
    dtype = torch.bfloat16 if speedup >= BF16_MARGIN else torch.float32
    return DtypeChoice(dtype, f"measured {workload} probe on this CPU: bf16 {speedup:.2f}x fp32 "
                              f"(bf16 needs >= {BF16_MARGIN}x){' [cached]' if timing.get('cached') else ''}")


def cpu_probe(workload: str) -> dict:
    """Seconds per probe iteration in fp32 and bf16, from the per-machine cache or measured now."""
    path, key = probe_cache_path(), machine_key(workload)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return {**cached[key], "cached": True}
    probe = _train_probe if workload == "train" else _inference_probe
    timing = _race({name: probe(DTYPES[name]) for name in ("fp32", "bf16")})
    cached[key] = timing
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError as exc:   # a read-only home only costs a re-measurement next time
        log.warning("could not cache the dtype probe in %s: %s", path, exc)
    return timing


def probe_cache_path() -> Path:
    root = os.environ.get("GPTSTACK_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptstack"
    return Path(root) / "dtype_probe.json"


def machine_key(workload: str) -> str:
    """CPU model + feature flags + threads + torch version: what decides which dtype is faster."""
    model, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    model = model or platform.processor() or platform.machine()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} flags:{digest} threads:{torch.get_num_threads()} torch:{torch.__version__} {workload}"


def _race(steps: dict, rounds: int = 5) -> dict[str, float]:
    """The best time of each step function over ``rounds`` rounds that run them in turn, so that a
    burst of other work on the machine slows both sides alike instead of deciding the race."""
    for step in steps.values():   # warm-up: first calls pick kernels and allocate
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _train_probe(dtype: torch.dtype):
    """One forward + backward of a GPT-block-shaped MLP and a vocabulary head under autocast, as
    a training step runs them (d 384, 512 tokens, 4k vocabulary)."""
    gen = torch.Generator().manual_seed(0)   # its own generator: the global RNG is left untouched
    d, tokens, vocab = 384, 512, 4096
    x = torch.randn(tokens, d, generator=gen)
    weights = [(torch.randn(4 * d, d, generator=gen) * 0.02).requires_grad_(),
               (torch.randn(d, 4 * d, generator=gen) * 0.02).requires_grad_(),
               (torch.randn(vocab, d, generator=gen) * 0.02).requires_grad_()]
    targets = torch.randint(0, vocab, (tokens,), generator=gen)

    def step():
        with autocast(torch.device("cpu"), dtype):
            h = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,)), weights[0]), approximate="tanh"), weights[1])
            loss = F.cross_entropy(F.linear(F.layer_norm(h, (d,)), weights[2]).float(), targets)
        loss.backward()
        for w in weights:
            w.grad = None
    return step


def _inference_probe(dtype: torch.dtype):
    """Decode steps over weights stored in ``dtype`` (64 MB in fp32, more than a CPU cache holds,
    as decoding streams every weight per step), at batch 1 and batch 8."""
    gen = torch.Generator().manual_seed(0)
    d = 1024
    weights = [(torch.randn(4 * d, d, generator=gen) * 0.02).to(dtype) for _ in range(4)]
    inputs = [torch.randn(rows, d, generator=gen).to(dtype) for rows in (1, 8)]

    @torch.no_grad()
    def step():
        for x in inputs:
            for w in weights:
                F.linear(x, w)
    return step


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
