"""A loads budget for prefetching: a cache never reads more than `ratio` x what LRU would.

Every prefetch is a read; a wrong one is a read LRU would not have made. The budget compares
this cache's loads (demand misses plus prefetches issued, CacheStats.loads) with a shadow LRU's
on the same accesses (prefetch_switch.ShadowLRU, fed every layer visit) and lets a prefetch go
only while (loads so far + 1) <= ratio x the shadow's loads: extra reads beyond the budget are
refused, demand loads never are. The same object runs in replay (simulator.simulate) and in the
engine (cache.ExpertCache via prediction.Prediction), where the measured prefetch switch reads its
per-visit LRU counts too (one shadow, fed once).

Warm-up: at the start both caches miss every access, so ratio x shadow loads leaves no room for
the first steps' prefetches (0.1 x 10 loads is one read). The allowance is therefore
max(ratio x lru, lru + warmup) with warmup = one layer's prefetch queue (prefetch_queue): the
first forecasts are issued whole, and once 0.1 x LRU's loads exceed it (80 loads for the default
queue of 8, a few steps) the ratio alone bounds the prefetches, so over a run of any length the
warm-up adds nothing to the final ratio.

Shape legend: none (counts).
"""
from __future__ import annotations

import math
from typing import Iterable

from expert_cache.policies import ExpertKey
from expert_cache.prefetch_switch import ShadowLRU


def prefetch_room(loads: int, lru_loads: int, ratio: float | None, warmup: int) -> int | None:
    """How many prefetches may be issued now: the largest n with loads + n <=
    max(ratio x lru_loads, lru_loads + warmup) (never negative). None: no budget (ratio None/0)."""
    if not ratio:
        return None
    # 1e-9: ratio x lru in floating point (1.1 x 30 = 33.000000000000004 or 32.99999999...)
    cap = max(math.floor(ratio * lru_loads + 1e-9), lru_loads + warmup)
    return max(0, cap - loads)


class LoadsBudget:
    """The shadow LRU's running load count and the room it leaves for prefetches."""

    def __init__(self, shadow: ShadowLRU, ratio: float | None, warmup: int) -> None:
        self.shadow, self.ratio, self.warmup = shadow, ratio, warmup
        self.lru_loads = 0
        self.bound_visits = 0  # visits whose prefetches the budget cut (reporting)

    def visit(self, keys: Iterable[ExpertKey]) -> int:
        """One layer visit's accesses, before its prefetches are planned; returns the loads LRU
        made on them."""
        n = self.shadow.visit(keys)
        self.lru_loads += n
        return n

    def limit(self, loads: int, limit: int) -> int:
        """`limit` (the prefetch queue's room) cut to what the budget allows, with `loads` this
        cache's loads so far."""
        room = prefetch_room(loads, self.lru_loads, self.ratio, self.warmup)
        if room is None or room >= limit:
            return limit
        self.bound_visits += 1
        return room

    def stats(self) -> dict:
        return {"prefetch_loads_budget": self.ratio, "shadow_lru_loads": self.lru_loads,
                "prefetch_budget_bound_visits": self.bound_visits}
