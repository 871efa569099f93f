"""Overload: ten times the server's queue bound of concurrent requests, in rounds.

Every request must be answered (200, or 429/503 telling the client to come back) within a bound,
/health must answer in under 200 ms throughout, and the server's memory must stay flat from round
to round (the first is a warm-up: the allocator's growth to its working size is not a leak).
tests/test_overload.py holds the same properties on the test model; this prints the figures.

    python bench/overload.py --checkpoint runs/demo/best --max-queue 8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

NO_ANSWER = 0     # the status recorded for a request that got no answer within the bound


@dataclass
class Round:
    statuses: collections.Counter     # HTTP status -> requests (NO_ANSWER: none in time)
    answer_seconds: list[float]       # per request, until its whole answer was read
    health_ms: list[float]            # each /health poll during the round (inf: no answer in 5 s)
    unfinished_streams: int           # streamed 200s that did not end with data: [DONE]
    rss_mb: float                     # the server's resident memory after the round


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, bool]:
    """(status, seconds until the whole answer was read, whether a streamed 200 ended with [DONE])."""
    started = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            text = (await response.aread()).decode()
    except httpx.TimeoutException:
        return NO_ANSWER, time.perf_counter() - started, True
    complete = response.status_code != 200 or not body.get("stream") or text.rstrip().endswith("data: [DONE]")
    return response.status_code, time.perf_counter() - started, complete


async def burst(url: str, key: str, bodies: list[dict], bound: float) -> list[tuple[int, float, bool]]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=bound, limits=limits) as client:
        return await asyncio.gather(*[one_request(client, url, body) for body in bodies])


def poll_health(url: str, stop, latencies_ms) -> None:
    """GET /health every 20 ms until ``stop`` is set, putting each answer's milliseconds (inf: none
    within 5 s) on the queue ``latencies_ms``, and None at the end."""
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies_ms.put((time.perf_counter() - started) * 1000 if ok else float("inf"))
            stop.wait(0.02)
    latencies_ms.put(None)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def overload_round(url: str, key: str, pid: int, requests: int, body: dict, bound: float) -> Round:
    """``requests`` at once (every other one streamed) while /health is polled from another process,
    as a load balancer would (the burst's own client work never delays a poll)."""
    context = multiprocessing.get_context("spawn")
    stop, latencies = context.Event(), context.Queue()
    poller = context.Process(target=poll_health, args=(url, stop, latencies))
    poller.start()
    health = [latencies.get(timeout=120)]      # the poller is up
    try:
        bodies = [{**body, "stream": i % 2 == 1} for i in range(requests)]
        results = asyncio.run(burst(url, key, bodies, bound))
    finally:
        stop.set()
        health.extend(iter(functools.partial(latencies.get, timeout=30), None))
        poller.join()
    time.sleep(1)    # let the server drop what the round left (cancelled rows, closed sockets)
    return Round(collections.Counter(status for status, _, _ in results), [t for _, t, _ in results], health,
                 sum(not complete for _, _, complete in results), rss_mb(pid))


def main() -> None:
    from machine import cpu_model    # bench/machine.py; here, not at the top: tests import this module
    from serve import launch, stop   # as bench.overload, without bench/ on the path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/best")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--factor", type=int, default=10, help="concurrent requests = factor x max-queue")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bound", type=float, default=120, help="seconds a request may take to be answered")
    args = parser.parse_args()
    key, requests = "bench-key", args.factor * args.max_queue
    proc, url = launch(args.checkpoint, key, ["--max-queue", str(args.max_queue),
                                              "--max-batch-size", str(args.max_batch_size)])
    try:
        body = {"model": "bench", "prompt": "ROMEO:", "max_tokens": args.max_tokens, "ignore_eos": True}
        start_rss = rss_mb(proc.pid)
        print(f"{args.checkpoint}: {requests} concurrent requests (max_queue {args.max_queue}, max_batch_size "
              f"{args.max_batch_size}, max_tokens {args.max_tokens}) per round; CPU: {cpu_model()}; "
              f"RSS at start {start_rss:.0f} MB\n")
        print("| round | 200 | 429 | 503 | other | no answer | cut streams | answer max (s) | /health polls "
              "| /health p50 / max (ms) | RSS after (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for i in range(args.rounds):
            r = overload_round(url, key, proc.pid, requests, body, args.bound)
            other = sum(n for status, n in r.statuses.items() if status not in (200, 429, 503, NO_ANSWER))
            print(f"| {i + 1} | {r.statuses[200]} | {r.statuses[429]} | {r.statuses[503]} | {other} | "
                  f"{r.statuses[NO_ANSWER]} | {r.unfinished_streams} | {max(r.answer_seconds):.2f} | {len(r.health_ms)} | "
                  f"{statistics.median(r.health_ms):.1f} / {max(r.health_ms):.1f} | {r.rss_mb:.0f} |", flush=True)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
