"""What the training benchmarks share: their command line, the peer's config and the timed step."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from gptstack.config import ModelConfig
from gptstack.runtime import autocast


def parse_args(doc: str, batch_size: int, steps: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def hf_config(cfg: ModelConfig, **extra):
    """A transformers GPT2Config of the same shape as ``cfg`` (SDPA attention, like ours)."""
    import transformers
    return transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                   n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.resid_pdrop,
                                   embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop,
                                   attn_implementation="sdpa", **extra)


def step_rate(model: torch.nn.Module, loss_fn: Callable, batches: list, dtype: torch.dtype, device: torch.device,
              warmup: int, count: Callable = lambda batch: batch.numel()) -> float:
    """Units per second (``count(batch)``: tokens by default) of full optimizer steps over ``batches``,
    timed after ``warmup`` of them: forward + backward under autocast, fused AdamW over the
    trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    model.to(device).train()
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        with autocast(device, dtype):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(count(b) for b in batches[warmup:]) / (time.perf_counter() - start)
