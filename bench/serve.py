"""Load generator for any OpenAI-compatible server, in the manner of `vllm bench serve`.

Sends streaming /v1/completions requests at a fixed concurrency (or a Poisson request rate) and
reports request throughput, output tokens/s, time to first token (TTFT) and inter-token latency
(ITL) with mean, p50 and p99. `--launch CHECKPOINT` starts `gptstack serve` on a free local port
for the run and stops it afterwards; `--launch-llama-server GGUF` does the same with llama.cpp's
`llama-server` (built from source by bench/llama_server.py). `--compare CHECKPOINT` runs both on the
same model, one after the other, at matching precisions (the checkpoint exported to GGUF: bf16 as
bf16, int8 as q8_0, int4 as q4_0, fp32 as f32), and prints their ratios.

    python bench/serve.py --launch runs/demo/best --concurrency 1,4,16 --requests 48 --max-tokens 64
    python bench/serve.py --url http://127.0.0.1:8000 --api-key KEY --model NAME --rate 4
    python bench/serve.py --launch-llama-server model.gguf --slots 16
    python bench/serve.py --compare runs/demo/best --precision bf16 --concurrency 1,4,16 --requests 32 --max-tokens 64
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# --compare --precision P: `gptstack serve` flags, and the GGUF type llama-server gets. int8 and int4
# weights meet bf16 activations and a bf16 KV cache (llama-server keeps its KV cache in f16): on the
# Zen 4 machine of docs/benchmarks.md that served 18% more tokens/s at 16 streams than fp32 activations.
PRECISIONS = {"fp32": (["--dtype", "fp32"], "f32"), "bf16": (["--dtype", "bf16"], "bf16"),
              "int8": (["--dtype", "bf16", "--quantize", "int8"], "q8_0"),
              "int4": (["--dtype", "bf16", "--quantize", "int4"], "q4_0")}
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
    last, first, itls, tokens, chunks = None, None, [], 0, 0
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
                chunks += 1
                if first is None:
                    first = now - start
                else:
                    itls.append(now - last)
                last = now
    # a server that sends no usage streams one token per chunk (llama-server does)
    return Result(True, first or 0.0, itls, tokens or chunks, time.perf_counter() - start)


async def run_load(url, key, model, concurrency, requests, max_tokens, rate, ignore_eos) -> tuple[list[Result], float]:
    # A connection per request: llama-server (cpp-httplib) closes a kept-alive connection after a few
    # requests, which httpx reports as an error on the next request instead of reconnecting.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(checkpoint: str, key: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port, log = free_port(), tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "gptstack.cli", "serve", "--checkpoint", checkpoint, "--port",
                             str(port), "--api-key", key, "--model-name", "bench", *extra],
                            stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, log, url + "/ready", "gptstack serve")
    if "--replicas" in extra:   # /ready answers once one replica is up: wait for all of them
        wanted, deadline = int(extra[extra.index("--replicas") + 1]), time.time() + 300
        while time.time() < deadline and httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}) \
                .text.count("gptstack_replica_info{") < wanted:
            time.sleep(0.5)
    return proc, url


def launch_llama_server(gguf: str, key: str, slots: int) -> tuple[subprocess.Popen, str]:
    """llama-server with ``slots`` sequences decoded together, each with the model's whole context,
    on as many threads as gptstack's torch uses (one per core)."""
    from gguf import GGUFReader
    from llama_server import llama_server
    context = int(GGUFReader(gguf).fields["gpt2.context_length"].contents())
    port, threads, log = free_port(), str(os.cpu_count()), tempfile.TemporaryFile()
    proc = subprocess.Popen([str(llama_server()), "--host", "127.0.0.1", "--port", str(port), "-m", gguf,
                             "-np", str(slots), "-c", str(context * slots), "-t", threads, "-tb", threads,
                             "--no-webui", "--api-key", key, "--alias", "bench"],
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    return wait_ready(proc, log, url + "/health", "llama-server"), url


def wait_ready(proc: subprocess.Popen, log, ready_url: str, name: str) -> subprocess.Popen:
    """``proc`` once ``ready_url`` answers 200; the end of its error output (``log``) if it exits first."""
    for _ in range(600):
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{name} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def measure(url: str, args: argparse.Namespace, levels: list[int]) -> dict[int, dict]:
    """A warm-up, then the load at each concurrency level; prints the table as it goes and returns
    each level's numbers."""
    ignore_eos = not args.no_ignore_eos
    asyncio.run(run_load(url, args.api_key, args.model, 2, 4, args.max_tokens, 0, ignore_eos))  # warm-up
    print(f"target: {url}  requests per level: {args.requests}  max_tokens: {args.max_tokens}\n")
    print("| concurrency | req/s | output tok/s | TTFT mean / p50 / p99 (ms) | ITL mean / p50 / p99 (ms) | errors |")
    print("|---:|---:|---:|---|---|---:|")
    levels_stats = {}
    for level in levels:
        results, elapsed = asyncio.run(run_load(url, args.api_key, args.model, level, args.requests,
                                                args.max_tokens, args.rate, ignore_eos))
        ok = [r for r in results if r.ok]
        ttft = [r.ttft * 1000 for r in ok]
        itl = [x * 1000 for r in ok for x in r.itls]
        stats = {"tokens_per_s": sum(r.tokens for r in ok) / elapsed, "ttft_p99": pct(ttft, .99)}
        print(f"| {level} | {len(ok) / elapsed:.2f} | {stats['tokens_per_s']:,.1f} | "
              f"{statistics.fmean(ttft):.0f} / {pct(ttft, .5):.0f} / {stats['ttft_p99']:.0f} | "
              f"{statistics.fmean(itl):.1f} / {pct(itl, .5):.1f} / {pct(itl, .99):.1f} | {len(results) - len(ok)} |",
              flush=True)
        levels_stats[level] = stats
    return levels_stats


def compare(args: argparse.Namespace, levels: list[int]) -> None:
    """gptstack serve and llama-server on the same checkpoint at the same precision, one after the
    other, then one table of both and their ratios."""
    from gptstack.interop.gguf import export_gguf
    serve_flags, gguf_type = PRECISIONS[args.precision]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = str(export_gguf(args.compare, Path(tmp) / f"model-{gguf_type}.gguf", gguf_type))
        servers = {f"gptstack {args.precision}": lambda: launch(args.compare, args.api_key, [
                       *args.serve_args.split(), *serve_flags, "--max-batch-size", str(args.slots)]),
                   f"llama-server {gguf_type}": lambda: launch_llama_server(gguf, args.api_key, args.slots)}
        runs = {}
        for name, start in servers.items():
            print(f"\n## {name}\n", flush=True)
            proc, url = start()
            try:
                runs[name] = measure(url, args, levels)
            finally:
                stop(proc)
    ours, theirs = runs.values()
    names = list(runs)
    print(f"\n## {names[0]} vs {names[1]}: output tokens/s and p99 time to first token\n")
    print(f"ratios are {names[0]} / {names[1]}: above 1 is better for gptstack in tokens/s, worse in TTFT\n")
    print(f"| concurrency | {names[0]} tok/s | {names[1]} tok/s | tok/s ratio | {names[0]} p99 TTFT (ms) | "
          f"{names[1]} p99 TTFT (ms) | TTFT ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        a, b = ours[level], theirs[level]
        print(f"| {level} | {a['tokens_per_s']:,.1f} | {b['tokens_per_s']:,.1f} | "
              f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {a['ttft_p99']:.0f} | {b['ttft_p99']:.0f} | "
              f"{a['ttft_p99'] / b['ttft_p99']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="")
    parser.add_argument("--api-key", default=os.environ.get("GPTSTACK_API_KEY", "bench-key"))
    parser.add_argument("--model", default="bench")
    parser.add_argument("--launch", help="a checkpoint to serve with gptstack for this run")
    parser.add_argument("--launch-llama-server", metavar="GGUF", help="a GGUF to serve with llama-server for this run")
    parser.add_argument("--compare", metavar="CHECKPOINT",
                        help="serve this checkpoint with gptstack, then as GGUF with llama-server, and compare")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16",
                        help="--compare: gptstack weights and the matching GGUF type (int8: q8_0, int4: q4_0)")
    parser.add_argument("--slots", type=int, default=16,
                        help="llama-server's parallel sequences (-np) and, with --compare, gptstack's --max-batch-size")
    parser.add_argument("--serve-args", default="--max-batch-size 16", help="extra `gptstack serve` flags with --launch")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s (Poisson); 0 = send as concurrency allows")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-ignore-eos", action="store_true", help="for servers without the ignore_eos extra")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.compare:
        compare(args, levels)
        return
    proc, url = None, args.url
    if args.launch:
        proc, url = launch(args.launch, args.api_key, args.serve_args.split())
    elif args.launch_llama_server:
        proc, url = launch_llama_server(args.launch_llama_server, args.api_key, args.slots)
    try:
        measure(url, args, levels)
    finally:
        if proc is not None:
            stop(proc)


if __name__ == "__main__":
    main()
