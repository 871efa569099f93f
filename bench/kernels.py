"""The decode matmuls of GPT-2 124M, path by path: GB/s of weights read and the tokens/s they allow.

One step of a batch-M decode multiplies M rows by every weight: 12 layers of qkv [2304x768],
attn c_proj [768x768], c_fc [3072x768], mlp c_proj [768x3072], and the LM head [50257x768]. Each
path runs that set at M = 1 and M = 16 (best of a few repeats); the roofline is memory read
bandwidth (a sum over 256 MB, as ../shared/tools/cpu_roofline.py measures it) over the bytes of
the weights in each format.

    python bench/kernels.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch
import torch.nn.functional as F

from gptstack.inference import kernels
from gptstack.inference.kernels import DecodeLinear

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]   # (out, in)
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5 + 4 / 32}              # per weight, with scales


def cpu_header() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "cpu: (no lscpu)"
    lscpu = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
    flags = [f for f in lscpu.get("Flags", "").split() if f.startswith(("avx", "amx", "fma"))]
    return f"cpu: {lscpu.get('Model name', '?').strip()}, {lscpu.get('CPU(s)', '?').strip()} CPUs; {' '.join(flags)}"


def read_bandwidth(n: int = 64 * 2**20) -> float:
    """GB/s of a sum over n fp32 values (256 MB: well past the caches)."""
    a = torch.empty(n).uniform_()
    return n * 4 / best_seconds(a.sum, 5) / 1e9


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def paths():
    """(name, weight format, step(x)) per path; x is one [M, in] activation per shape. Each path's
    weights are dropped once the next is made, so one set (or two) is in memory at a time."""
    fp32 = [torch.randn(n, k) for n, k in SHAPES]
    yield "torch F.linear fp32", "fp32", lambda x: [F.linear(xi, w) for xi, w in zip(x, fp32)]
    bf16 = [w.to(torch.bfloat16) for w in fp32]
    del fp32[:]
    yield "torch F.linear bf16", "bf16", lambda x: [F.linear(xi.to(torch.bfloat16), w) for xi, w in zip(x, bf16)]
    del bf16[:]
    if hasattr(torch, "_weight_int8pack_mm"):
        int8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for n, k in SHAPES]
        scales = [torch.rand(n, dtype=torch.bfloat16) for n, _ in SHAPES]
        # bf16 activations, as cpu_roofline.py: its fp32 kernel is several times slower here
        yield "torch _weight_int8pack_mm", "int8", lambda x: [torch._weight_int8pack_mm(xi.to(torch.bfloat16), w, s)
                                                             for xi, w, s in zip(x, int8, scales)]
        del int8[:]
    if kernels.available():
        for fmt in kernels.FORMATS:
            layers = [DecodeLinear(torch.nn.Linear(k, n, bias=False), fmt) for n, k in SHAPES]
            yield f"gptstack kernel {fmt}", fmt, lambda x: [l.run("kernel", xi) for l, xi in zip(layers, x)]
            del layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = sum(n * k for n, k in SHAPES)
    bandwidth = read_bandwidth()
    print(cpu_header())
    print(f"torch {torch.__version__}, {args.threads} threads, kernels: {kernels.isa()}; "
          f"{weights / 1e6:.1f} M weights per step; read bandwidth {bandwidth:.1f} GB/s\n")
    print("| path | M=1 ms | M=1 GB/s | M=1 tokens/s | M=16 tokens/s | roofline M=1 tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    x1, x16 = ([torch.randn(rows, k) for _, k in SHAPES] for rows in (1, 16))
    for name, fmt, step in paths():
        seconds = best_seconds(lambda: step(x1), args.repeats)
        step_16 = best_seconds(lambda: step(x16), args.repeats)
        nbytes = weights * WEIGHT_BYTES[fmt]
        print(f"| {name} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} | {1 / seconds:,.0f} | "
              f"{16 / step_16:,.0f} | {bandwidth * 1e9 / nbytes:,.0f} |")


if __name__ == "__main__":
    main()
