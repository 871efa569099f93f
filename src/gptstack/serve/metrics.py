"""Prometheus metrics of the server and its engine, in a registry of the app's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..inference.engine import Engine

if TYPE_CHECKING:
    from .backend import Backend

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self, backend: Backend):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptstack_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("gptstack_errors", "error responses by HTTP status code", ["code"], registry=r)
        self.ttft = Histogram("gptstack_time_to_first_token_seconds", "time from submit to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptstack_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineLoads(backend))

    def count_error(self, status: int) -> None:
        self.errors.labels(code=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineLoads:
    """The engines' gauges and counts, read at scrape time (an engine knows of requests the HTTP
    layer never sees finish, such as those cancelled after their client left). Behind replicas each
    series has a ``replica`` label, and ``replica="total"`` is their sum."""

    GAUGES = {"queue_depth": "requests waiting for a batch slot", "batch_size": "requests in the running batch",
              "batch_slots": "requests that may run at once (maximum batch size)",
              "kv_cache_blocks": "blocks in the paged KV cache",
              "kv_cache_blocks_free": "KV cache blocks free or holding only cached prefixes"}
    COUNTERS = {"requests": "requests submitted to the engine", "prompt_tokens": "prompt tokens prefilled",
                "generated_tokens": "tokens generated", "decode_steps": "forward passes (decode rows and prompt chunks together)",
                "cancelled": "requests cancelled (client gone or cancelled)",
                "prefix_cache_hit_tokens": "prompt tokens found in the prefix cache, not computed",
                "preempted": "running requests sent back to the queue for want of KV cache blocks"}

    def __init__(self, backend: Backend):
        self.backend = backend

    def collect(self):
        loads = self.backend.loads()
        if None not in loads:    # replicas: which process each is, each one's series, then the total
            info = GaugeMetricFamily("gptstack_replica_info", "engine replicas by name and process id",
                                     labels=["replica", "pid"])
            for replica, load in loads.items():
                info.add_metric([replica, str(int(load["pid"]))], 1)
            yield info
            loads = {**loads, "total": {key: sum(load[key] for load in loads.values())
                                        for key in (*self.GAUGES, *self.COUNTERS)}}
        labels = [] if None in loads else ["replica"]
        for key, doc in (*self.GAUGES.items(), *self.COUNTERS.items()):
            if key in self.GAUGES:
                family = GaugeMetricFamily(f"gptstack_{key}", doc, labels=labels)
            else:
                name = "gptstack_requests_cancelled" if key == "cancelled" else f"gptstack_engine_{key}"
                family = CounterMetricFamily(name, doc, labels=labels)
            for replica, load in loads.items():
                family.add_metric([replica] if labels else [], load[key])
            yield family


def engine_load(engine: Engine) -> dict[str, float]:
    """What EngineLoads reports of one engine at this moment, as plain numbers (they cross processes)."""
    gauges = (engine.queue_depth, engine.batch_size, engine.slots, engine.cache.num_blocks, engine.blocks.available)
    return {**dict(zip(EngineLoads.GAUGES, gauges)), **{key: engine.stats[key] for key in EngineLoads.COUNTERS}}
