"""Parallel layouts on this machine: DDP vs FSDP2 vs tensor vs pipeline parallel, 2 CPU processes.

Each layout trains the same model on the same global batch with `gptstack train` under torchrun
(gloo), and the table shows what it costs and what it saves: tokens/s (the median logging window
after the first), the bytes of parameters, gradients and optimizer state each process holds (as the
run logs them after its first step) and each process's measured peak resident memory by then (all
of a training step's allocations, before any evaluation or checkpoint).

    python bench/parallel.py [--preset gpt2] [--block-size 256] [--steps 8] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gptstack.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "src" / "gptstack" / "assets" / "corpus" / "tinyshakespeare.txt"


def layouts(processes: int) -> dict[str, dict]:
    """Settings per layout; every one trains on `processes` micro-batches of the same size per step."""
    return {"DDP": {"grad_accum_steps": 1},
            "FSDP2": {"fsdp": True, "grad_accum_steps": 1},
            f"tensor parallel {processes}": {"tensor_parallel": processes, "grad_accum_steps": processes},
            f"pipeline parallel {processes} (1F1B)": {"pipeline_parallel": processes, "grad_accum_steps": processes}}


def train(settings: dict, args, data: Path, out: Path) -> list[dict]:
    config = {"data": data, "out_dir": out, "preset": args.preset, "model.block_size": args.block_size,
              "batch_size": args.batch_size, "max_steps": args.steps, "eval_interval": 10 ** 6, "log_interval": 1,
              "warmup_steps": 1, "dtype": args.dtype, "progress": False, "tensorboard": False, "peak_flops": 1e12,
              **settings}
    flags = [item for key, value in config.items() for item in (f"--{key}", str(value))]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.processes), "-m", "gptstack.cli", "train", *flags], check=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // args.processes))},
                   stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in lscpu if l.startswith("Model name")), "unknown CPU")
    flags = next((l.split(":", 1)[1].split() for l in lscpu if l.startswith("Flags")), [])
    print(f"machine: {cpu}, {os.cpu_count()} cores; flags: "
          f"{' '.join(f for f in flags if f.startswith(('avx512', 'amx', 'avx2')))}")
    print(f"model: {args.preset}, context {args.block_size}; {args.processes} processes (gloo), {args.dtype}; "
          f"global batch {args.processes} x {args.batch_size} sequences per step, {args.steps} steps\n")
    print("| layout | tokens/s | vs DDP | params / process | grads / process | optimizer / process | peak RSS / process, first step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([CORPUS], data, progress=False)
        baseline = None
        for name, settings in layouts(args.processes).items():
            rows = train(settings, args, data, Path(tmp) / name.replace(" ", "_"))
            rate = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1)
            held = next(r for r in rows if r.get("event") == "memory")["held_bytes_per_rank"]
            peak = [rank["peak_memory_mib"] for rank in held]   # after the first step, before any evaluation
            baseline = baseline or rate

            def mb(kind: str) -> str:
                return " / ".join(f"{rank[kind] / 2 ** 20:,.0f}" for rank in held) + " MiB"
            print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x | {mb('parameters')} | {mb('gradients')} | "
                  f"{mb('optimizer')} | {' / '.join(f'{p:,.0f}' for p in peak)} MiB |")


if __name__ == "__main__":
    main()
