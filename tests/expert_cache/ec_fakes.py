"""An ExpertCache on a fake slow tier, driven by hand: the spec, tier and forecast source it needs.

The fake tier fills expert (l, e) with the value 100*l + e, can hold the transfer worker inside a
read (a threading.Event) so copies stay in flight deterministically, without sleeps, and can fail
the reads of chosen keys.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from expert_cache.cache import ExpertCache
from expert_cache.config import CacheConfig
from expert_cache.slow_tier import SlowTier
from moe_rt.layers.moe.events import Forecast

D, I = 4, 3


def fake_spec(num_layers: int, num_experts: int):
    return SimpleNamespace(moe_layer_ids=tuple(range(num_layers)), num_experts=num_experts,
                           hidden_size=D, moe=SimpleNamespace(intermediate_size=I),
                           bytes_per_expert=lambda b: 3 * D * I * b)


class FakeTier(SlowTier):
    name = "disk"

    def __init__(self):
        self.reads: list[tuple] = []
        self.hold: set = set()  # keys whose read blocks until `gate` is set
        self.fail: set = set()  # keys whose read raises
        self.gate = threading.Event()
        self.entered = threading.Event()  # set when a held read has started
        self.lock = threading.Lock()

    def read_into(self, key, w13, w2):
        with self.lock:
            self.reads.append(key)
        if key in self.hold:
            self.entered.set()
            assert self.gate.wait(timeout=30), "test never released the gate"
        if key in self.fail:
            raise OSError(f"cannot read expert {key}")
        w13.fill_(100 * key[0] + key[1])
        w2.fill_(100 * key[0] + key[1])


class Source:
    """Forecasts made by hand, handed to the cache as an MoE block hands the forecaster's."""

    def __init__(self, cache: ExpertCache, num_experts: int):
        self.cache, self.num_experts = cache, num_experts

    def send(self, target, scores, d=1, grades=None):
        """grades (expert -> picks per grade): a GradedForecast, as the online forecaster makes."""
        if grades:
            from router_predict.graded import GradedForecast

            self.cache.prefetch([GradedForecast(target, scores, d, grades)])
        else:
            self.cache.prefetch([Forecast(target, scores, d)])

    def forecast(self, target, experts, d=1):
        scores = torch.zeros(self.num_experts)
        scores[list(experts)] = 1.0
        self.send(target, scores, d)


def make_cache(num_layers: int, num_experts: int, slots: int, prefetch: bool = True,
               depth: int = 1, timer=None, **cfg):
    tier = FakeTier()
    # Prefetch every forecast key by default: these tests drive the plumbing by hand and must not
    # depend on measured times (the cost rule has its own tests).
    cfg.setdefault("prefetch_rule", "always")
    cfg.setdefault("prefetch_switch", "on")  # nor on the measured on/off switch (its own tests)
    cfg = CacheConfig(offload="disk", capacity_slots=slots, **cfg)
    cache = ExpertCache(fake_spec(num_layers, num_experts), tier, cfg,
                        device=torch.device("cpu"), dtype=torch.float32, timer=timer)
    src = Source(cache, num_experts)
    if prefetch:
        cache.start_prefetch(depth=depth, max_depth=depth)
    return cache, tier, src


def check_layer(cache: ExpertCache, experts, layer: int, topk: torch.Tensor) -> None:
    """Every chosen expert maps to a slot holding its weights, and the kernel's slot map is
    CacheState's view (unless the layer was streamed through a one-off stack)."""
    slots = experts.slots(topk)
    for e, s in zip(topk.flatten().tolist(), slots.flatten().tolist()):
        assert s >= 0
        assert experts.w13[s].eq(100 * layer + e).all() and experts.w2[s].eq(100 * layer + e).all()
    st = cache.state
    st.check_consistent()
    pool = st.pool_of((layer, 0))
    if experts.w13 is cache.w13[pool]:
        view = [st.slot_of((layer, e)) for e in range(cache.num_experts)]
        assert experts.slot_of.tolist() == [-1 if s is None else s for s in view]
