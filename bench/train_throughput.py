"""Training throughput: gptstack's training step against Hugging Face transformers' GPT2LMHeadModel.

Both models have the same shape (a preset, default the demo's `cpu-small`), see the same batches,
and take the same step: forward + backward under autocast, fused AdamW. Prints a markdown table of
tokens/s, MFU (against this machine's measured matmul rate in that dtype) and the ratio to the peer.

    python bench/train_throughput.py [--preset cpu-small] [--batch-size 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from gptstack.config import model_info, preset
from gptstack.model import GPT
from gptstack.runtime import DTYPES, autocast, resolve_device, tune_allocator
from gptstack.train.metrics import measure_peak_flops


def hf_model(cfg):
    import transformers
    config = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.resid_pdrop,
                                     embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop,
                                     attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def step_rate(model, loss_fn, batches, dtype, device, warmup: int) -> float:
    """Tokens per second of full optimizer steps over ``batches`` (after ``warmup`` of them)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    for i, idx in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        with autocast(device, dtype):
            loss = loss_fn(model, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(b.numel() for b in batches[warmup:]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

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
