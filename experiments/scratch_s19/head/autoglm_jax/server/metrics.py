"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own per app.

Counted by the server as requests pass through it:

* ``autoglm_requests_total{endpoint, status}``: HTTP answers by status code (200, 400, 404, 429, 500).
* ``autoglm_request_finished_total{finish_reason}``: stop / length / tool_calls / abort (client gone).
* ``autoglm_prompt_tokens_total``, ``autoglm_generation_tokens_total``.
* ``autoglm_time_to_first_token_seconds``: request arrival -> first token reaching the server (histogram).
* ``autoglm_inter_token_latency_seconds``: gaps between a request's consecutive tokens (histogram).
* ``autoglm_e2e_request_latency_seconds``: arrival -> last token (histogram).
* ``autoglm_requests_in_flight``: admitted and not yet finished (the bound behind 429).

Read from the engine's scheduler at every scrape (``SchedulerStats``):

* ``autoglm_kv_pages_in_use`` (pages referenced by requests), ``autoglm_kv_pages_total``,
  ``autoglm_kv_pages_evictable`` (held only by the prefix cache: free to reuse),
* ``autoglm_prefix_cache_hit_rate`` (hit tokens / looked-up prompt tokens), ``autoglm_prefix_cache_hit_tokens_total``,
* ``autoglm_evictions_total``, ``autoglm_preemptions_total``, ``autoglm_num_requests_running``,
  ``autoglm_num_requests_waiting``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], object]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = {"kv_pages_in_use": ("KV pages referenced by requests", s.pages_in_use),
                  "kv_pages_total": ("usable KV pages (null page excluded)", s.pages_total),
                  "kv_pages_evictable": ("KV pages held only by the prefix cache", s.pages_evictable),
                  "prefix_cache_hit_rate": ("prefix-cache hit tokens / looked-up prompt tokens", s.prefix_hit_rate),
                  "num_requests_running": ("requests holding KV pages", s.num_running),
                  "num_requests_waiting": ("requests queued in the scheduler", s.num_waiting)}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"autoglm_{name}", doc, value=float(value))
        counters = {"evictions": ("prefix-cache pages evicted", s.evictions),
                    "preemptions": ("requests preempted (recompute)", s.preemptions),
                    "prefix_cache_hit_tokens": ("prompt tokens served by the prefix cache", s.prefix_hit_tokens),
                    "prefix_cache_lookup_tokens": ("prompt tokens looked up in the prefix cache",
                                                   s.prefix_lookup_tokens)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"autoglm_{name}", doc, value=float(value))


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], object]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("autoglm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.finished = Counter("autoglm_request_finished", "finished generations", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("autoglm_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("autoglm_time_to_first_token_seconds", "arrival -> first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("autoglm_inter_token_latency_seconds", "gap between consecutive tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("autoglm_e2e_request_latency_seconds", "arrival -> last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("autoglm_requests_in_flight", "requests admitted and not finished", registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels} value`` lines -> {"name{labels}": value} (tests and the benchmark read /metrics)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
