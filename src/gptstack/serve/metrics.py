"""Prometheus metrics of the server and its engine, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..inference.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptstack_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("gptstack_errors", "error responses by HTTP status code", ["code"], registry=r)
        self.prompt_tokens = Counter("gptstack_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("gptstack_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("gptstack_requests_cancelled", "requests cancelled (client gone or cancelled)", registry=r)
        self.ttft = Histogram("gptstack_time_to_first_token_seconds", "time from submit to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptstack_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        Gauge("gptstack_queue_depth", "requests waiting for a batch slot", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("gptstack_batch_size", "requests in the running batch", registry=r).set_function(lambda: engine.batch_size)
        Gauge("gptstack_batch_slots", "KV cache slots (maximum batch size)", registry=r).set_function(lambda: engine.slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)
