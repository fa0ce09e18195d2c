"""Prometheus metrics of one server, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "q8chat_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "q8chat_time_to_first_token_seconds",
            "From request arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "q8chat_inter_token_latency_seconds", "Between generated tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("q8chat_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_prompt_tokens = Counter(
            "q8chat_cached_prompt_tokens", "Prompt tokens served from the KV cache", registry=r
        )
        self.generation_tokens = Counter("q8chat_generation_tokens", "Generated tokens", registry=r)
        self.queue_waiting = Gauge("q8chat_queue_waiting", "Requests waiting for their turn", registry=r)
        self.running = Gauge("q8chat_running", "Generations running (0 or 1: batch size 1)", registry=r)
        self.model_load_seconds = Gauge("q8chat_model_load_seconds", "Time to load (or quantize) the model", registry=r)

    def watch_queue(self, queue) -> None:
        """Read the queue's gauges at scrape time."""
        self.queue_waiting.set_function(lambda: queue.waiting)
        self.running.set_function(lambda: queue.running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
