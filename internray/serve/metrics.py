"""The engine's Prometheus metrics (served at /metrics): latency histograms, token counters,
and gauges read from the scheduler when scraped."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineMetrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        labels = {"model": model}

        def metric(kind, name, doc, **kw):
            return kind(f"internray_{name}", doc, ["model"], registry=self.registry, **kw).labels(**labels)

        self.ttft = metric(Histogram, "time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS)
        self.tpot = metric(Histogram, "time_per_output_token_seconds", "Gap between a request's tokens",
                           buckets=LATENCY_BUCKETS)
        self.prompt_tokens = metric(Counter, "prompt_tokens", "Prompt tokens computed (cache hits excluded)")
        self.generation_tokens = metric(Counter, "generation_tokens", "Tokens generated")
        self.requests = metric(Counter, "requests_finished", "Requests finished")
        self.running = metric(Gauge, "requests_running", "Sequences holding KV blocks")
        self.waiting = metric(Gauge, "requests_waiting", "Sequences waiting for admission")
        self.kv_usage = metric(Gauge, "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
        self.prefix_hit_rate = metric(Gauge, "prefix_cache_hit_ratio", "Prompt blocks found in the prefix cache")
        self.preemptions = metric(Gauge, "preemptions", "Sequences preempted so far")

    def render(self, status: dict) -> bytes:
        self.running.set(status["running"])
        self.waiting.set(status["waiting"])
        self.kv_usage.set(status["kv_usage"])
        self.prefix_hit_rate.set(status["prefix_hit_rate"])
        self.preemptions.set(status["preemptions"])
        return generate_latest(self.registry)
