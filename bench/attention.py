"""GPT-3's locally banded attention: block-local (what gptstack runs) against dense attention under
the band mask (what it ran before) and plain causal attention, forward + backward.

Each variant runs in a fresh process, so its peak resident memory above the inputs is its own.
Prints a markdown table of milliseconds per forward + backward and peak extra memory.

    python bench/attention.py [--seq 2048] [--band 256] [--heads 12] [--head-dim 64] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

import torch
import torch.nn.functional as F

from gptstack.model import local_attention


def band_mask(T: int, band: int) -> torch.Tensor:
    """[T, T]: query i sees key j iff i - band < j <= i (dense attention under GPT-3's band)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    return (j <= i) & (j > i - band)


VARIANTS = {
    "banded, block-local (gptstack)": lambda q, k, v, band, p: local_attention(q, k, v, band, p),
    "banded, dense + mask (before)": lambda q, k, v, band, p: F.scaled_dot_product_attention(
        q, k, v, attn_mask=band_mask(q.shape[2], band), dropout_p=p),
    "dense causal (is_causal)": lambda q, k, v, band, p: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                       dropout_p=p),
}


def measure(name: str, args: argparse.Namespace, out) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq, args.head_dim, requires_grad=True) for _ in range(3))
    run = VARIANTS[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # the inputs and torch itself
    run(q, k, v, args.band, args.dropout).sum().backward()   # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(q, k, v, args.band, args.dropout).sum().backward()
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put((name, min(times), peak_kib, before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--band", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout (training with attn_pdrop)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; batch 1 x {args.heads} heads x T {args.seq} x d {args.head_dim}, "
          f"band {args.band}, attention dropout {args.dropout}, fp32, best of {args.repeats}\n")
    print("| attention | forward + backward (ms) | peak memory above the inputs (MiB) | vs dense + mask |")
    print("|---|---:|---:|---:|")
    context = mp.get_context("spawn")
    results = {}
    for name in VARIANTS:
        queue = context.Queue()
        process = context.Process(target=measure, args=(name, args, queue))
        process.start()
        results[name] = queue.get()
        process.join()
    reference = results["banded, dense + mask (before)"][1]
    for name, seconds, peak_kib, before_kib in results.values():
        print(f"| {name} | {seconds * 1e3:,.1f} | {(peak_kib - before_kib) / 1024:,.0f} | "
              f"{reference / seconds:.2f}x faster |")


if __name__ == "__main__":
    main()
