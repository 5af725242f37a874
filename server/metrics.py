"""Prometheus metrics of one app, in a CollectorRegistry the app owns (never the global one).

Request-side figures (counts, latencies) are recorded by the handlers; engine-side figures
(queue, batch, tokens) are read from the AsyncEngine's stats snapshot at scrape time; MoE figures
come from the engine's optional `moe_stats()` dict, refreshed by the /metrics handler.

MoE dict shape understood here: top-level numbers become `moe_rt_moe_<key>`; a "layers" entry that
is a list of dicts (or a dict keyed by layer) becomes `moe_rt_moe_layer_<key>{layer="i"}` for each
numeric field. Anything else is left to /v1/moe/stats.
"""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", str(key))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _EngineCollector:
    """Reads the engine snapshot at scrape time, so the numbers never go stale."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def collect(self):
        s = self.engine.stats
        yield GaugeMetricFamily("moe_rt_queue_length", "requests waiting for their first token", value=self.engine.queue_length)
        yield GaugeMetricFamily("moe_rt_max_queue", "queue bound; one more request gets 429", value=self.engine.max_queue)
        yield GaugeMetricFamily("moe_rt_running_batch_size", "sequences in the running batch", value=s.running_seqs)
        yield GaugeMetricFamily("moe_rt_waiting_sequences", "sequences in the engine waiting for KV or a batch slot", value=s.waiting_seqs)
        yield GaugeMetricFamily("moe_rt_last_step_batch_size", "sequences in the last engine step", value=s.last_batch_size)
        yield GaugeMetricFamily("moe_rt_max_step_batch_size", "largest engine step batch since start", value=s.max_batch_size)
        yield CounterMetricFamily("moe_rt_engine_steps", "engine steps", value=s.num_steps)
        yield CounterMetricFamily("moe_rt_generation_tokens", "output tokens generated", value=s.generation_tokens_total)
        yield CounterMetricFamily("moe_rt_prompt_tokens", "prompt tokens admitted", value=s.prompt_tokens_total)
        yield CounterMetricFamily("moe_rt_requests_aborted", "requests aborted unfinished (KV freed)", value=s.requests_aborted)
        yield CounterMetricFamily("moe_rt_preemptions", "sequences preempted for KV space", value=s.num_preemptions)
        yield GaugeMetricFamily("moe_rt_generation_tokens_per_second", "output tokens/s over the last 10 s",
                                value=self.engine.tokens_per_second(10.0))
        yield GaugeMetricFamily("moe_rt_kv_cache_usage", "fraction of KV blocks in use",
                                value=1 - s.kv_blocks_free / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield GaugeMetricFamily("moe_rt_engine_ready", "1 once the model is loaded and the engine loop runs",
                                value=float(self.engine.ready))
        yield from self._moe(self.metrics.moe_stats)

    @staticmethod
    def _moe(stats: dict | None):
        if not stats:
            return
        for key, v in stats.items():
            if _is_number(v):
                yield GaugeMetricFamily(f"moe_rt_moe_{_metric_name(key)}", f"engine moe_stats {key}", value=v)
        layers = stats.get("layers")
        rows = layers.items() if isinstance(layers, dict) else enumerate(layers) if isinstance(layers, list) else []
        families: dict[str, GaugeMetricFamily] = {}
        for layer, row in rows:
            if not isinstance(row, dict):
                continue
            layer = row.get("layer", layer)
            for key, v in row.items():
                if key == "layer" or not _is_number(v):
                    continue
                name = f"moe_rt_moe_layer_{_metric_name(key)}"
                fam = families.setdefault(name, GaugeMetricFamily(name, f"engine moe_stats per layer {key}", labels=["layer"]))
                fam.add_metric([str(layer)], v)
        yield from families.values()


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.moe_stats: dict | None = None  # refreshed by the /metrics handler before a scrape
        r = self.registry
        self.requests = Counter("moe_rt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("moe_rt_time_to_first_token_seconds", "request arrival to its first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("moe_rt_time_per_output_token_seconds", "(end-to-end - TTFT) / (output tokens - 1)",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("moe_rt_e2e_request_latency_seconds", "request arrival to its last output token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.output_tokens = Histogram("moe_rt_request_output_tokens", "output tokens per request",
                                       buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)
        r.register(_EngineCollector(engine, self))

    def observe_request(self, ttft: float | None, e2e: float, output_tokens: int) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))
        self.e2e.observe(e2e)
        self.output_tokens.observe(output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
