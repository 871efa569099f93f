"""Decode matmuls: our C++ kernels (csrc/, built as ``gptstack._kernels``) behind nn.Linear's interface.

Decoding a token reads every weight once, so at a few rows of activations a linear layer is as fast
as it streams its weight. PyTorch's CPU kernels reach only part of the memory bandwidth there
(docs/benchmarks.md); ours pack the weight into panels of 16 output channels, K-major, read each
weight once for all rows, and come in fp32, bf16, int8 (one scale per output channel) and int4
(q4_0-like: one scale per output channel and group of 32 inputs, symmetric). Where the CPU has integer
dot products (AVX2, AVX512-VNNI) the int8 kernel rounds the activations to int8 per group of 32 (as
llama.cpp's q8_0 matmul does, see :func:`int8_rounds_activations`): converting each weight to fp32
cost more than streaming it. The kernel copy for the
best instruction set the CPU has is picked at run time; ``GPTSTACK_KERNEL_ISA`` (or
:func:`select_isa`) caps it, so every copy the machine can run can be tested.

At a prefill chunk's hundreds of rows a matmul is compute-bound, and oneDNN / MKL's ``F.linear``
may beat the kernels: :class:`DecodeLinear` picks its path by the number of rows, from thresholds
that :func:`calibrate` measures on the model's own shapes. Without the extension (a build without
torch, a non-CPU device) the layers run the PyTorch paths, which are also the tests' oracle.

The library also holds decode attention over the paged KV cache; :func:`paged_decode_attention`
lives in ``gptstack.ops`` (the model layer, which loads the library) because kv_cache.py calls it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import library as _ops   # torch.ops.gptstack, or None without the extension
from ..ops import paged_decode_attention  # noqa: F401  (re-exported: the KV cache calls it from ..ops)

FORMATS = ("fp32", "bf16", "int8", "int4")
LANES = 16            # output channels per panel
TILE_CHANNELS = 64    # out_features is padded to whole tiles of panels
GROUP_K = 32          # int4 inputs per scale; in_features is padded to a multiple of it


def available() -> bool:
    """True when the C++ kernels were built and loaded."""
    return _ops is not None


def isa() -> str:
    """The kernel copy in use: "avx512_bf16", "avx512_vnni", "avx512", "avx2" or "generic" ("unavailable"
    without kernels)."""
    return _ops.isa() if _ops is not None else "unavailable"


def int8_rounds_activations() -> bool:
    """True when the int8 kernel in use multiplies int8 activations (integer dot products: AVX2,
    AVX512-VNNI): each row's activations are rounded per group of 32 to int8 with their own scale, as
    llama.cpp's q8_0 matmul does. Otherwise it converts the weights to fp32 (weight-only int8)."""
    return _ops is not None and _ops.int8_rounds_activations()


def select_isa(cap: str) -> str:
    """Use at most the ``cap`` instruction set (one of those :func:`isa` names); returns the one in use."""
    if _ops is None:
        raise RuntimeError("the gptstack kernels are not built")
    return _ops.select_isa(cap)


# ---- formats, in nn.Linear's [out, in] layout ----------------------------------------------------------

@dataclass
class QuantizedWeight:
    """A weight in one of :data:`FORMATS`, [out, in] as PyTorch ops take it.

    ``values``: the fp32 / bf16 weight, or int8 codes (int4 codes are int8 in [-8, 7]);
    ``scales``: int8 [out], int4 [out, ceil(in / 32)], else None."""

    format: str
    values: torch.Tensor
    scales: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.format in ("fp32", "bf16"):
            return self.values.to(dtype)
        if self.format == "int8":
            return (self.values.float() * self.scales[:, None]).to(dtype)
        out, k = self.values.shape
        grouped = _pad_to(self.values.float(), out, self.scales.shape[1] * GROUP_K).view(out, -1, GROUP_K)
        return (grouped * self.scales[:, :, None]).view(out, -1)[:, :k].to(dtype)


def quantize_weight(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """``weight`` [out, in] in format ``fmt``: int8 absmax per output channel; int4 as llama.cpp's
    q4_0 (per group of 32 inputs the value of largest magnitude maps to -8, so all 16 codes are used)."""
    weight = weight.detach()
    if fmt == "fp32":
        return QuantizedWeight(fmt, weight.float().contiguous())
    if fmt == "bf16":
        return QuantizedWeight(fmt, weight.to(torch.bfloat16).contiguous())
    weight = weight.float()
    if fmt == "int8":
        scale = weight.abs().amax(dim=1) / 127
        codes = torch.round(weight / _nonzero(scale)[:, None]).clamp(-127, 127)
        return QuantizedWeight(fmt, codes.to(torch.int8), scale)
    if fmt == "int4":
        out, k = weight.shape
        groups = _pad_to(weight, out, _round_up(k, GROUP_K)).view(out, -1, GROUP_K)
        extreme = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        scale = extreme / -8
        codes = torch.round(groups / _nonzero(scale)[:, :, None]).clamp(-8, 7)
        return QuantizedWeight(fmt, codes.view(out, -1)[:, :k].to(torch.int8).contiguous(), scale)
    raise ValueError(f"weights must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Scales of all-zero rows or groups divide as 1 (their codes are 0 either way)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


# ---- the kernels' layout: panels of 16 output channels, K-major ----------------------------------------

def pack(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(panels, scales) as the kernels read them (csrc/decode_kernels.cpp). out_features is padded with
    zero channels to a multiple of 64, in_features with zeros to a multiple of 32. Panels: fp32
    [P, K, 16]; bf16 [P, K/2, 16, 2] (a lane's two k of a pair side by side); int8 [P, K/4, 16, 4] (four
    k side by side, as integer dot-product instructions read them); int4 [P, K/2, 16] bytes, k even in
    the low nibble, each code + 8. Scales: int8 [N], int4 [P, K/32, 16]."""
    out, k = weight.values.shape
    n_pad, k_pad = _round_up(out, TILE_CHANNELS), _round_up(k, GROUP_K)
    panels = n_pad // LANES
    values = _pad_to(weight.values, n_pad, k_pad)
    if weight.format == "fp32":
        packed = values.view(panels, LANES, k_pad).transpose(1, 2)
    elif weight.format in ("bf16", "int8"):     # k pairs (bf16) or quads (int8) of a lane side by side
        group = 2 if weight.format == "bf16" else 4
        packed = values.view(panels, LANES, k_pad // group, group).permute(0, 2, 1, 3)
    else:
        nibbles = (values + 8).to(torch.uint8).view(panels, LANES, k_pad // 2, 2)
        packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).transpose(1, 2)
    scales = weight.scales
    if weight.format == "int8":
        scales = F.pad(scales, (0, n_pad - out))
    elif weight.format == "int4":
        scales = _pad_to(scales, n_pad, k_pad // GROUP_K).view(panels, LANES, -1).transpose(1, 2).contiguous()
    return packed.contiguous(), scales


def unpack(fmt: str, panels: torch.Tensor, scales: torch.Tensor | None, out_features: int,
           in_features: int) -> QuantizedWeight:
    """The inverse of :func:`pack`."""
    n_pad = panels.shape[0] * LANES
    if fmt == "fp32":
        values = panels.transpose(1, 2).reshape(n_pad, -1)
    elif fmt in ("bf16", "int8"):
        values = panels.permute(0, 2, 1, 3).reshape(n_pad, -1)
    else:
        bytes_ = panels.transpose(1, 2)
        values = (torch.stack([bytes_ & 15, bytes_ >> 4], dim=-1).reshape(n_pad, -1).to(torch.int8) - 8)
    if fmt == "int8":
        scales = scales[:out_features]
    elif fmt == "int4":
        scales = scales.transpose(1, 2).reshape(n_pad, -1)[:out_features]
    return QuantizedWeight(fmt, values[:out_features, :in_features], scales)


# ---- the layer -----------------------------------------------------------------------------------------

_KERNEL_OPS = {"fp32": "linear_fp32", "bf16": "linear_bf16", "int8": "linear_int8", "int4": "linear_int4"}


class DecodeLinear(nn.Module):
    """A drop-in for an inference-only ``nn.Linear`` ([..., in] -> [..., out]) with its weight in
    ``fmt``. On a CPU with the kernels the weight is kept packed for them, otherwise as
    :class:`QuantizedWeight` for PyTorch ops. Paths, picked per call by the number of rows M:

    - ``kernel``: our kernels;
    - ``torch``: ``F.linear`` in the activations' dtype on the dequantized weight;
    - ``torch_bf16``: ``F.linear`` in bf16 (fp32 activations converted; wins where the CPU has bf16 units);
    - ``int8pack``: ``torch._weight_int8pack_mm`` (int8 weights, CPU).

    ``plan`` lists (largest M, path), ascending; :func:`calibrate` measures it."""

    def __init__(self, linear: nn.Linear, fmt: str):
        super().__init__()
        self.format, self.in_features, self.out_features = fmt, linear.in_features, linear.out_features
        weight = quantize_weight(linear.weight, fmt)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = available() and linear.weight.device.type == "cpu"
        if self.packed:
            values, scales = pack(weight)
            bias = None if bias is None else F.pad(bias, (0, values.shape[0] * LANES - self.out_features))
            self._kernel_op = getattr(_ops, _KERNEL_OPS[fmt]).default
        else:
            values, scales = weight.values, weight.scales
        self.register_buffer("weight", values)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.plan: list[tuple[float, str]] = [(math.inf, self.candidate_paths()[0])]

    def candidate_paths(self, dtype: torch.dtype = torch.float32) -> list[str]:
        """The paths this layer can take for activations of ``dtype``, the default first."""
        if self.weight.device.type != "cpu":
            return ["torch"]
        paths = []
        if self.packed:
            paths.append("kernel")
        elif self.format == "bf16" and dtype != torch.bfloat16:
            paths.append("torch_bf16")        # the weight is bf16 already: no conversion per call
        if self.format == "int8" and not self.packed and hasattr(torch, "_weight_int8pack_mm"):
            paths.append("int8pack")          # (packed, it would unpack per call and lose to the kernel)
        paths.append("torch")
        if dtype != torch.bfloat16 and self.format != "fp32" and "torch_bf16" not in paths:
            paths.append("torch_bf16")        # (fp32 weights keep fp32 arithmetic)
        return paths

    def quantized_weight(self) -> QuantizedWeight:
        """The weight in [out, in] layout (unpacked per call when kept packed)."""
        if self.packed:
            return unpack(self.format, self.weight, self.scales, self.out_features, self.in_features)
        return QuantizedWeight(self.format, self.weight, self.scales)

    def path_for(self, rows: int) -> str:
        return next(path for largest, path in self.plan if rows <= largest)   # the plan ends at M = inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self.run(self.path_for(rows.shape[0]), rows)
        return y.view(*x.shape[:-1], self.out_features)

    def run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, in] through ``path``; the result has x's dtype."""
        if path == "kernel":
            scales = () if self.scales is None else (self.scales,)
            y = self._kernel_op(x, self.weight, *scales, self.bias, self.out_features)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        weight = self.quantized_weight()
        bias = None if self.bias is None else self.bias[:self.out_features]
        if path == "int8pack":
            y = torch._weight_int8pack_mm(x, weight.values, weight.scales.to(x.dtype))
            return y if bias is None else y + bias.to(y.dtype)
        dtype = torch.bfloat16 if path == "torch_bf16" else x.dtype
        y = F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        plan = ", ".join(f"{path} to M={largest}" for largest, path in self.plan)
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, {plan}"


# ---- picking paths by measurement --------------------------------------------------------------------

@dataclass
class ShapeChoice:
    """What :func:`calibrate` found for the layers of one shape: seconds per layer by path and M."""

    shape: tuple[int, int]          # (out, in)
    count: int                      # layers of this shape in the model
    seconds: dict[str, dict[int, float]]
    plan: list[tuple[float, str]]

    def best(self, rows: int) -> float:
        return min(times[rows] for times in self.seconds.values())


@dataclass
class CalibrationReport:
    """Paths chosen per layer shape; ``str()`` is a short table for a log."""

    format: str
    isa: str
    threads: int
    sizes: tuple[int, ...]
    shapes: list[ShapeChoice] = field(default_factory=list)
    seconds: float = 0.0

    def tokens_per_second(self, rows: int) -> float:
        """Rows per second through all the calibrated layers at batch ``rows``, matmuls alone."""
        step = sum(s.count * s.best(rows) for s in self.shapes)
        return rows / step if step else math.inf

    def __str__(self) -> str:
        lines = [f"decode matmuls, {self.format} weights, kernels {self.isa}, {self.threads} threads "
                 f"(calibrated in {self.seconds:.1f} s):"]
        for s in self.shapes:
            plan = ", ".join(f"{path} to M={largest if largest != math.inf else 'any'}" for largest, path in s.plan)
            lines.append(f"  {s.shape[0]}x{s.shape[1]} (x{s.count}): {plan}")
        rates = ", ".join(f"M={m}: {self.tokens_per_second(m):,.0f}" for m in self.sizes)
        lines.append(f"  tokens/s the matmuls allow: {rates}")
        return "\n".join(lines)


def _seconds_per_call(fn, budget: float = 0.02, most: int = 5) -> float:
    """The best of a few timed calls; a call slower than ``budget`` is timed once."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = first
    for _ in range(min(most, int(budget / max(first, 1e-9)))):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def calibrate(model_or_layers: nn.Module | Iterable[DecodeLinear], sizes: Iterable[int] = (1, 4, 16, 64, 256),
              dtype: torch.dtype | None = None) -> CalibrationReport:
    """Time every path of every layer shape at ``sizes`` rows of ``dtype`` activations (default: the
    model's floating dtype) and set each layer's plan: M uses the path fastest at the smallest
    calibrated size >= M (the largest size beyond it). A timing runs all the layers of a shape in
    turn, so their weights come from memory as in a real step, not from the cache; about 5 s for
    GPT-2 124M on 2 cores."""
    start = time.perf_counter()
    module_list = list(model_or_layers.modules()) if isinstance(model_or_layers, nn.Module) else list(model_or_layers)
    layers = [m for m in module_list if isinstance(m, DecodeLinear)]
    if dtype is None and isinstance(model_or_layers, nn.Module):
        dtype = next((p.dtype for p in model_or_layers.parameters() if p.is_floating_point()), torch.float32)
    dtype = dtype or torch.float32
    sizes = tuple(sorted(set(sizes)))
    by_shape: dict[tuple, list[DecodeLinear]] = {}
    for layer in layers:
        key = (layer.out_features, layer.in_features, layer.format, layer.bias is not None, layer.weight.device)
        by_shape.setdefault(key, []).append(layer)
    report = CalibrationReport(layers[0].format if layers else "", isa(), torch.get_num_threads(), sizes)
    for (out, k, *_), group in by_shape.items():
        seconds: dict[str, dict[int, float]] = {}
        for path in group[0].candidate_paths(dtype):
            seconds[path] = {}
            for rows in sizes:
                x = torch.randn(rows, k, dtype=dtype, device=group[0].weight.device)
                per_group = _seconds_per_call(lambda: [layer.run(path, x) for layer in group])
                seconds[path][rows] = per_group / len(group)
        plan: list[tuple[float, str]] = []
        for rows in sizes:
            fastest = min(seconds, key=lambda path: seconds[path][rows])
            if plan and plan[-1][1] == fastest:
                plan[-1] = (rows, fastest)
            else:
                plan.append((rows, fastest))
        plan[-1] = (math.inf, plan[-1][1])
        for member in group:
            member.plan = plan
        report.shapes.append(ShapeChoice((out, k), len(group), seconds, plan))
    report.seconds = time.perf_counter() - start
    return report
