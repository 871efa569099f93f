"""Load generator for any OpenAI-compatible server, in the manner of `vllm bench serve`.

Sends streaming /v1/completions requests at a fixed concurrency (or a Poisson request rate) and
reports request throughput, output tokens/s, time to first token (TTFT) and inter-token latency
(ITL) with mean, p50 and p99. `--launch CHECKPOINT` starts `gptstack serve` on a free local port
for the run and stops it afterwards.

    python bench/serve.py --launch runs/demo/best --concurrency 1,4,16 --requests 48 --max-tokens 64
    python bench/serve.py --url http://127.0.0.1:8000 --api-key KEY --model NAME --rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING RICHARD III:\nNow is the winter of our discontent", "HAMLET:\nTo be, or not to be",
           "MENENIUS:\nI tell you, friends, most charitable care", "LADY MACBETH:\nOut, damned spot!",
           "PROSPERO:\nOur revels now are ended."]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    latency: float = 0.0
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      ignore_eos: bool) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    last, first, itls, tokens = None, None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return Result(False, error=f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if first is None:
                    first = now - start
                else:
                    itls.append(now - last)
                last = now
    return Result(True, first or 0.0, itls, tokens, time.perf_counter() - start)


async def run_load(url, key, model, concurrency, requests, max_tokens, rate, ignore_eos) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)
        rng = random.Random(0)

        async def task(i):
            async with semaphore:
                return await one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, ignore_eos)

        start = time.perf_counter()
        tasks = []
        for i in range(requests):
            tasks.append(asyncio.create_task(task(i)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def launch(checkpoint: str, key: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptstack.cli", "serve", "--checkpoint", checkpoint, "--port",
                             str(port), "--api-key", key, "--model-name", "bench", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="")
    parser.add_argument("--api-key", default=os.environ.get("GPTSTACK_API_KEY", "bench-key"))
    parser.add_argument("--model", default="bench")
    parser.add_argument("--launch", help="a checkpoint to serve with gptstack for this run")
    parser.add_argument("--serve-args", default="--max-batch-size 16", help="extra `gptstack serve` flags with --launch")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s (Poisson); 0 = send as concurrency allows")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-ignore-eos", action="store_true", help="for servers without the ignore_eos extra")
    args = parser.parse_args()

    proc = None
    url = args.url
    if args.launch:
        proc, url = launch(args.launch, args.api_key, args.serve_args.split())
    try:
        asyncio.run(run_load(url, args.api_key, args.model, 2, 4, args.max_tokens, 0, not args.no_ignore_eos))  # warm-up
        print(f"target: {url}  requests per level: {args.requests}  max_tokens: {args.max_tokens}\n")
        print("| concurrency | req/s | output tok/s | TTFT mean / p50 / p99 (ms) | ITL mean / p50 / p99 (ms) | errors |")
        print("|---:|---:|---:|---|---|---:|")
        for level in [int(c) for c in args.concurrency.split(",")]:
            results, elapsed = asyncio.run(run_load(url, args.api_key, args.model, level, args.requests,
                                                    args.max_tokens, args.rate, not args.no_ignore_eos))
            ok = [r for r in results if r.ok]
            ttft = [r.ttft * 1000 for r in ok]
            itl = [x * 1000 for r in ok for x in r.itls]
            print(f"| {level} | {len(ok) / elapsed:.2f} | {sum(r.tokens for r in ok) / elapsed:,.1f} | "
                  f"{statistics.fmean(ttft):.0f} / {pct(ttft, .5):.0f} / {pct(ttft, .99):.0f} | "
                  f"{statistics.fmean(itl):.1f} / {pct(itl, .5):.1f} / {pct(itl, .99):.1f} | {len(results) - len(ok)} |")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
