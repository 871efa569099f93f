"""Training throughput: gptstack's training step against Hugging Face transformers' GPT2LMHeadModel.

Both models have the same shape (a preset, default the demo's `cpu-small`), see the same batches,
and take the same step: forward + backward under autocast, fused AdamW. Prints a markdown table of
tokens/s, MFU (against this machine's measured matmul rate in that dtype) and the ratio to the peer.

    python bench/train_throughput.py [--preset cpu-small] [--batch-size 16] [--steps 10]
"""

from __future__ import annotations

import platform

import torch

from gptstack.config import model_info, preset
from gptstack.model import GPT
from gptstack.runtime import DTYPES, resolve_device, tune_allocator
from gptstack.train.metrics import measure_peak_flops
from timing import hf_config, parse_args, step_rate


def hf_model(cfg):
    import transformers
    return transformers.GPT2LMHeadModel(hf_config(cfg))


def main() -> None:
    args = parse_args(__doc__, batch_size=16, steps=10)

    tune_allocator()
    device = resolve_device(args.device)
    cfg = preset(args.preset).model
    flops_per_token = model_info(cfg)["flops_per_token_train"]
    torch.manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
               for _ in range(args.warmup + args.steps)]

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}")
    print(f"model: {args.preset} ({GPT(cfg).num_parameters() / 1e6:.1f}M parameters), batch {args.batch_size} x "
          f"{cfg.block_size} tokens, {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| dtype | implementation | tokens/s | MFU | vs transformers |")
    print("|---|---|---:|---:|---:|")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        peak = measure_peak_flops(device, dtype)
        ours = step_rate(GPT(cfg).to(device), lambda m, idx: m(idx, idx)[1], batches, dtype, device, args.warmup)
        theirs = step_rate(hf_model(cfg).to(device), lambda m, idx: m(input_ids=idx, labels=idx).loss,
                           batches, dtype, device, args.warmup)
        for label, rate in (("gptstack", ours), ("transformers GPT2LMHeadModel", theirs)):
            print(f"| {name} | {label} | {rate:,.0f} | {flops_per_token * rate / peak:.1%} | {rate / theirs:.2f}x |")
    print(f"\nMFU denominator: measured {2048}x{2048} matmul rate per dtype on this device.")


if __name__ == "__main__":
    main()
