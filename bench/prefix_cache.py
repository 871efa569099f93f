"""Time to first token with a shared 200-token prompt prefix, with and without the prefix cache.

Starts `gptstack serve` on CHECKPOINT (default: a GPT-2 124M-shaped model from a fixed seed) twice (--prefix-caching, then --no-prefix-caching). Each time
one request warms the server with the shared prefix, then N requests send the same prefix followed
by a question of their own, one after another, streaming, and the time to their first token is
measured. With the cache, the later requests find the prefix's blocks computed and prefill only
their own tail.

    python bench/prefix_cache.py [--checkpoint runs/demo/best] [--requests 16] [--prefix-tokens 200] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import httpx

from serve import launch, one_request, pct
import gptstack
from gptstack.checkpoint import save_checkpoint
from gptstack.config import preset
from gptstack.model import GPT
from gptstack.tokenizer import load_tokenizer

QUESTIONS = ["Who speaks first?", "What does the citizen want?", "Why is Caius Marcius hated?",
             "Name a noble.", "What is the price of corn?", "Who is Menenius?", "Say it in one line.",
             "What do the Senators decide?"]


def shared_prefix(tokens: int) -> str:
    """The first ``tokens`` tokens of the bundled Shakespeare, as text, as a system prompt."""
    tokenizer = load_tokenizer("gpt2")
    text = (Path(gptstack.__file__).parent / "assets/corpus/tinyshakespeare.txt").read_text()[:4000]
    return tokenizer.decode(tokenizer.encode(text)[:tokens])


async def ttfts(url: str, key: str, prefix: str, requests: int) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        first = await one_request(client, url, "bench", prefix + "\nQ: Who is there?\nA:", 8, True)
        later = [await one_request(client, url, "bench", f"{prefix}\nQ: {QUESTIONS[i % len(QUESTIONS)]} ({i})\nA:",
                                   8, True) for i in range(requests)]
    return first.ttft, [r.ttft for r in later]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: a gpt2-preset model initialised from seed 0")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=200)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    prefix, key = shared_prefix(args.prefix_tokens), "bench-key"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            import torch
            torch.manual_seed(0)
            args.checkpoint = save_checkpoint(Path(tmp) / "gpt2", GPT(preset("gpt2").model), load_tokenizer("gpt2"))
        for flag in ("--prefix-caching", "--no-prefix-caching"):
            proc, url = launch(str(args.checkpoint), key, [flag, "--dtype", args.dtype])
            try:
                rows[flag] = asyncio.run(ttfts(url, key, prefix, args.requests))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout.split(":")[-1]
    print(f"machine: {cpu.strip()} ({platform.machine()}); checkpoint {args.checkpoint}, {args.dtype}; "
          f"shared prefix {args.prefix_tokens} tokens, {args.requests} later requests one after another\n")
    print("| prefix cache | first request TTFT ms | later requests TTFT mean / p50 / p99 ms |")
    print("|---|---:|---:|")
    for flag, (first, later) in rows.items():
        print(f"| {'on' if flag == '--prefix-caching' else 'off'} | {first * 1e3:.1f} | "
              f"{statistics.mean(later) * 1e3:.1f} / {pct(later, 0.5) * 1e3:.1f} / {pct(later, 0.99) * 1e3:.1f} |")
    on, off = (statistics.mean(rows[f][1]) for f in ("--prefix-caching", "--no-prefix-caching"))
    print(f"\nlater requests' TTFT without the cache / with it: {off / on:.1f}x")


if __name__ == "__main__":
    main()
