"""Prometheus metrics of one server, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        self.running = Gauge("q8chat_running", "Generations running (up to --max-batch)", registry=r)
        self.model_load_seconds = Gauge("q8chat_model_load_seconds", "Time to load (or quantize) the model", registry=r)

    def watch_queue(self, queue) -> None:
        """Read the queue's gauges at scrape time, ours and those that Kubernetes' Gateway API inference
        extension and llm-d read from vLLM to route requests."""
        self.queue_waiting.set_function(lambda: queue.waiting)
        self.running.set_function(lambda: queue.running)
        Gauge("vllm:num_requests_waiting", "Requests waiting (vLLM's name)", registry=self.registry).set_function(
            lambda: queue.waiting
        )
        Gauge("vllm:num_requests_running", "Requests running (vLLM's name)", registry=self.registry).set_function(
            lambda: queue.running
        )

    def watch_prefix_cache(self, cache) -> None:
        """The kept conversations' figures, read at scrape time (``cache``: a PrefixCache, or None)."""
        self.registry.register(_PrefixCacheCollector(cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCollector:
    def __init__(self, cache) -> None:
        self._cache = cache

    def collect(self):
        cache = self._cache
        kept = cache.nbytes if cache is not None else 0
        budget = cache.budget_bytes if cache is not None else 0
        yield GaugeMetricFamily("q8chat_prefix_cache_bytes", "KV bytes of kept past conversations", value=kept)
        yield GaugeMetricFamily(
            "q8chat_prefix_cache_conversations", "Past conversations kept", value=len(cache) if cache else 0
        )
        yield CounterMetricFamily(
            "q8chat_prefix_cache_hits",
            "Prompts that continued a kept past conversation further than the live cache",
            value=cache.hits if cache is not None else 0,
        )
        yield CounterMetricFamily(
            "q8chat_prefix_cache_misses",
            "Prompts that continued no kept conversation further than the live cache",
            value=cache.misses if cache is not None else 0,
        )
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "Fraction of the kept-conversation budget in use (vLLM's name)",
            value=kept / budget if budget else 0.0,
        )
