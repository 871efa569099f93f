"""`gptstack serve --replicas 2` on Ray Serve, through the official openai client: the API, rate
limits shared across replicas, and a replica killed with SIGKILL under load."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest
import torch

from conftest import Server

pytest.importorskip("ray.serve", reason="the ray extra (pip install 'gptstack[ray]') is not installed")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
KEYS = [f"replica-key-{i}" for i in range(6)]      # one per test: the limit is per key
REQUESTS_PER_MINUTE = 6


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory):
    """A tiny model with a long context, so that streams last seconds (time to kill a replica)."""
    from gptstack.checkpoint import save_checkpoint
    from gptstack.config import preset
    from gptstack.model import GPT
    from gptstack.tokenizer import load_tokenizer
    cfg = preset("tiny").model
    cfg.block_size = 4096
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("replicas") / "tiny-long"
    save_checkpoint(directory, GPT(cfg), load_tokenizer("gpt2"))
    return directory


@pytest.fixture(scope="module")
def replicas(long_context_checkpoint):
    server = Server(long_context_checkpoint, "--replicas", "2", "--threads-per-replica", "1",
                    "--max-batch-size", "8", "--requests-per-minute", str(REQUESTS_PER_MINUTE),
                    *[f"--api-key={key}" for key in KEYS])
    wait_for_engines(server, 2)     # /ready answers once one engine replica is up
    yield server
    server.stop()


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def replica_metrics(server: Server) -> dict[str, dict[str, float]]:
    """Per replica (and "total"): pid and each series of /metrics that has a replica label."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}).text
    by_replica: dict[str, dict[str, float]] = {}
    for name, labels, value in re.findall(r'^(gptstack_\w+)\{([^}]*replica="[^"]+"[^}]*)\} (\S+)$', text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        entry = by_replica.setdefault(fields["replica"], {})
        if name == "gptstack_replica_info":
            entry["pid"] = int(fields["pid"])
        else:
            entry[name] = float(value)
    return by_replica


def engine_metrics(server: Server) -> dict[str, dict[str, float]]:
    return {r: m for r, m in replica_metrics(server).items() if r != "total"}


def wait_for_engines(server: Server, count: int, timeout: float = 120) -> dict[str, dict[str, float]]:
    deadline = time.time() + timeout
    while len(engines := engine_metrics(server)) != count and time.time() < deadline:
        time.sleep(0.5)
    return engines


def test_completions_chat_and_streaming_through_replicas(replicas):
    c = client(replicas, KEYS[0])
    text = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, extra_body={"ignore_eos": True})
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 8
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                     extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5 and chat.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) != ""
    metrics = replica_metrics(replicas)
    engines = {r: m for r, m in metrics.items() if r != "total"}
    assert len(engines) == 2 and all(m["pid"] > 0 for m in engines.values())
    assert metrics["total"]["gptstack_batch_slots"] == 16 and len({m["pid"] for m in engines.values()}) == 2
    # bad input is still a 4xx in OpenAI's shape behind Ray, and a missing key a 401
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        c.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"no_such_field": 1})
    with pytest.raises(openai.AuthenticationError):
        client(replicas, "wrong-key").completions.create(model="tiny", prompt="x", max_tokens=2)


def test_rate_limit_holds_across_replicas(replicas):
    """Requests that land on both replicas share one key's budget: 6 of 8 pass, not 12."""
    time.sleep(1.5)     # the replicas' counts reach /metrics every half second
    before = replica_metrics(replicas)
    c = client(replicas, KEYS[1])
    outcomes: list[str] = []

    def ask():
        try:
            c.completions.create(model="tiny", prompt="to be", max_tokens=400, extra_body={"ignore_eos": True})
            outcomes.append("ok")
        except openai.RateLimitError:
            outcomes.append("429")
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["429"] * 2 + ["ok"] * REQUESTS_PER_MINUTE
    time.sleep(1.5)
    after = replica_metrics(replicas)
    served = {r: after[r]["gptstack_engine_requests_total"] - before[r]["gptstack_engine_requests_total"]
              for r in before if r != "total"}
    assert sum(served.values()) == REQUESTS_PER_MINUTE
    assert all(n > 0 for n in served.values()), f"one replica took every request: {served}"


def test_killed_replica_fails_only_its_own_streams(replicas):
    """SIGKILL one replica while 6 streams run: exactly the streams it was decoding end with a
    clear error naming it; the rest finish; new requests are answered; Ray starts a new replica."""
    c = client(replicas, KEYS[2])
    first_token = [threading.Event() for _ in range(6)]
    results: list[str | None] = [None] * 6

    def stream(i):
        try:
            for chunk in c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=4000, stream=True,
                                              extra_body={"ignore_eos": True}):
                first_token[i].set()
            results[i] = "finished"
        except openai.APIError as exc:
            results[i] = str(exc)
        finally:
            first_token[i].set()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in first_token)
    assert results == [None] * 6, f"streams ended before the kill: {results}"
    time.sleep(1.5)       # running counts reach /metrics
    metrics = replica_metrics(replicas)
    engines = {r: m for r, m in metrics.items() if r != "total"}
    victim = max(engines, key=lambda r: engines[r]["gptstack_batch_size"])
    running_on_victim = int(engines[victim]["gptstack_batch_size"])
    assert running_on_victim >= 1 and metrics["total"]["gptstack_batch_size"] == 6
    os.kill(engines[victim]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(180)
    failures = [r for r in results if r != "finished"]
    assert len(failures) == running_on_victim, results
    assert all(f"engine replica {victim} stopped" in f for f in failures), failures
    # the survivors answer at once, and Ray replaces the dead replica
    c3 = client(replicas, KEYS[3])
    assert c3.completions.create(model="tiny", prompt="x", max_tokens=3, extra_body={"ignore_eos": True}).usage.completion_tokens == 3
    time.sleep(LOAD_STALE_SECONDS := 3.5)      # the dead replica's last report expires
    engines = wait_for_engines(replicas, 2)
    assert len(engines) == 2 and victim not in engines, engines


def test_sigterm_drains_streams_in_flight_then_exits(replicas):
    """Last (it stops the server): SIGTERM lets the streams already running finish every token,
    then the process exits 0."""
    c = client(replicas, KEYS[4])
    started = [threading.Event() for _ in range(2)]
    tokens = [0, 0]

    def stream(i):
        for chunk in c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=300, stream=True,
                                          stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            started[i].set()
            if chunk.usage:
                tokens[i] = chunk.usage.completion_tokens
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    replicas.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert replicas.proc.wait(timeout=120) == 0, replicas.output()
    assert tokens == [300, 300], f"streams were cut by the shutdown: {tokens}"
