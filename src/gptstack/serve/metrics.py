"""Prometheus metrics of the server and its engine, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from ..inference.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptstack_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("gptstack_errors", "error responses by HTTP status code", ["code"], registry=r)
        self.ttft = Histogram("gptstack_time_to_first_token_seconds", "time from submit to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptstack_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        Gauge("gptstack_queue_depth", "requests waiting for a batch slot", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("gptstack_batch_size", "requests in the running batch", registry=r).set_function(lambda: engine.batch_size)
        Gauge("gptstack_batch_slots", "requests that may run at once (maximum batch size)",
              registry=r).set_function(lambda: engine.slots)
        Gauge("gptstack_kv_cache_blocks", "blocks in the paged KV cache", registry=r).set_function(
            lambda: engine.cache.num_blocks)
        Gauge("gptstack_kv_cache_blocks_free", "KV cache blocks free or holding only cached prefixes",
              registry=r).set_function(lambda: engine.blocks.available)

        r.register(EngineCounters(engine))

    def count_error(self, status: int) -> None:
        self.errors.labels(code=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCounters:
    """The engine's own counts, read at scrape time (the engine knows of requests the HTTP layer
    never sees finish, such as those cancelled after their client left)."""

    NAMES = {"requests": "requests submitted to the engine", "prompt_tokens": "prompt tokens prefilled",
             "generated_tokens": "tokens generated", "decode_steps": "forward passes (decode rows and prompt chunks together)",
             "cancelled": "requests cancelled (client gone or cancelled)",
             "prefix_cache_hit_tokens": "prompt tokens found in the prefix cache, not computed",
             "preempted": "running requests sent back to the queue for want of KV cache blocks"}

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        for key, doc in self.NAMES.items():
            name = "gptstack_requests_cancelled" if key == "cancelled" else f"gptstack_engine_{key}"
            yield CounterMetricFamily(name, doc, value=self.engine.stats[key])
