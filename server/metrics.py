"""Prometheus metrics of one app, in a CollectorRegistry the app owns (never the global one).

Request-side figures (counts, latencies) are recorded by the handlers; engine-side figures
(queue, batch, tokens) are read from the AsyncEngine's stats snapshot at scrape time; MoE figures
come from the engine's optional `moe_stats()` dict, refreshed by the /metrics handler.

engine.moe_stats() is {source: {...}} (cache, predictor, expert parallelism). Every numeric leaf
becomes a gauge named by its key path, `moe_rt_moe_<source>_<key>[_<subkey>]`; a list (per MoE
layer) adds a `layer` label, e.g. moe_rt_moe_ep_a2a_bytes_by_layer{layer="3"}. Strings are left to
/v1/moe/stats.
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
                                value=s.kv_cache_usage)
        yield GaugeMetricFamily("moe_rt_engine_ready", "1 once the model is loaded and the engine loop runs",
                                value=float(self.engine.ready))
        yield from self._moe(self.metrics.moe_stats)

    @staticmethod
    def _moe(stats: dict | None):
        families: dict[tuple, GaugeMetricFamily] = {}
        for path, labels, value in _flatten(stats or {}, [], {}):
            name = "moe_rt_moe_" + "_".join(_metric_name(p) for p in path)
            key = (name, tuple(labels))
            if key not in families:
                if any(k[0] == name for k in families):  # same name, other labels: keep both apart
                    name += "_by_" + "_".join(labels)
                families[key] = GaugeMetricFamily(name, f"engine moe_stats {'.'.join(map(str, path))}", labels=list(labels))
            families[key].add_metric(list(labels.values()), value)
        yield from families.values()


def _flatten(obj, path: list, labels: dict):
    """(path, labels, number) for every numeric leaf of engine.moe_stats(): dict keys extend the
    name; list positions become a `layer` label (or the row's own "layer" field)."""
    if isinstance(obj, bool):
        yield path, labels, float(obj)
    elif _is_number(obj):
        yield path, labels, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not (k == "layer" and "layer" in labels):
                yield from _flatten(v, path + [k], labels)
    elif isinstance(obj, (list, tuple)):
        label = "layer" if "layer" not in labels else f"index{len(labels)}"
        for i, v in enumerate(obj):
            pos = v.get("layer", i) if isinstance(v, dict) and label == "layer" else i
            yield from _flatten(v, path, {**labels, label: str(pos)})


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.moe_stats: dict | None = None  # refreshed by the /metrics handler before a scrape
        r = self.registry
        self.requests = Counter("moe_rt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.request_failures = Counter("moe_rt_request_failures", "requests that ended in a server-side error "
                                        "(a 500, or an error event in a started stream)", registry=r)
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
