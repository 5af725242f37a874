"""Replay and the in-engine cache make the same decisions.

A recorded routing sequence is replayed by the simulator and run through an ExpertCache (fake
slow tier, real transfer engine; prefetches settled before the next layer, which is replay's
model of instant loads). Every CacheState transition both make is journaled; the two journals,
hits, misses, prefetch hits, loads, evictions (with their slots) and streamed misses in order,
must be equal, and so must the final counters.
"""
import pytest
import torch

import ec_fakes
from ec_helpers import noisy_schedule, random_trace
from expert_cache.simulator import BatchNeeds, SimOptions, oracle_schedule, pool_slots, simulate
from expert_cache.state import CacheState
from router_predict.trace import step_bounds

L, E = 3, 6


@pytest.fixture
def journal(monkeypatch):
    """CacheState transitions, as [(state, [event, ...])] in the order the states first acted
    (ticks left out: replay counts one per visit from 0, the cache one per prepare from 1)."""
    logs: list[tuple[CacheState, list]] = []

    def log_of(state):
        for st, log in logs:
            if st is state:
                return log
        logs.append((state, []))
        return logs[-1][1]

    def spy(name, event):
        orig = getattr(CacheState, name)

        def wrapper(self, *args, **kw):
            out = orig(self, *args, **kw)
            log_of(self).append(event(args, kw, out))
            return out

        monkeypatch.setattr(CacheState, name, wrapper)

    spy("access", lambda a, kw, out: (out, a[0]))
    spy("admit", lambda a, kw, out: ("prefetch" if kw.get("prefetch") else "load", a[0], out))
    spy("evict", lambda a, kw, out: ("evict", a[0], out))
    spy("record_streamed", lambda a, kw, out: ("stream", a[0]))
    spy("abort_load", lambda a, kw, out: ("abort", a[0], out))
    return logs


def feed(src: ec_fakes.Source, forecast: dict, layer: int, depth: int) -> None:
    """Send replay's forecast made after `layer` through the OnlinePredictor's hook: one score
    vector per target layer, distance 1 first (it opens the round)."""
    for d in range(1, depth + 1):
        scores = torch.zeros(E)
        grades = {}
        for (m, e), p in forecast.items():
            if m == layer + d:
                scores[e] = p.score
                if p.grades:
                    grades[e] = p.grades
        src.send(layer + d, scores, d, grades)


def run_cache(trace, policy, slots, scope, schedule, queue, pinned):
    depth = schedule.depth if schedule is not None else 1
    cache, tier, src = ec_fakes.make_cache(
        L, E, slots, prefetch=schedule is not None, depth=depth, policy=policy, scope=scope,
        prefetch_queue=queue, pinned={l: [e] for l, e in pinned})  # the test feeds replay's forecasts
    try:
        for s, (_, a, b) in enumerate(step_bounds(trace.steps)):
            for l in range(L):
                if schedule is not None:
                    feed(src, schedule.forecasts[s][l], l, depth)
                topk = torch.from_numpy(trace.topk_ids[a:b, l]).long()
                ec_fakes.check_layer(cache, cache.prepare(l, topk), l, topk)
                cache.settle()
        return cache, tier
    finally:
        cache.close()


CASES = [  # policy, slots per layer, scope, look-ahead (None: no prefetch), prefetch queue, pinned
    ("lru", 2, "per_layer", None, 0, ()),
    ("lfu", 3, "per_layer", None, 0, ()),
    ("lru", 1, "global", None, 0, ((1, 0),)),
    ("lfu", 2, "global", None, 0, ()),
    ("predictive", 1, "per_layer", 1, 8, ()),
    ("predictive", 3, "per_layer", 2, 2, ((0, 1),)),
    ("predictive", 2, "global", 2, 8, ()),
    ("predictive", 4, "global", 1, 3, ((2, 5),)),
    ("predictive", 3, "per_layer", 1, 0, ()),
]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("policy, cap, scope, depth, queue, pinned", CASES)
def test_replay_and_runtime_take_the_same_decisions(journal, seed, policy, cap, scope, depth,
                                                     queue, pinned):
    trace = random_trace(seed, n=40, num_layers=L, num_experts=E)
    schedule = oracle_schedule(trace, depth) if depth is not None else None
    slots = pool_slots(cap, scope, L)
    expert_bytes = ec_fakes.fake_spec(L, E).bytes_per_expert(4)  # float32
    sim = simulate(BatchNeeds.from_trace(trace),  # make_cache's rule: every forecast key
                   SimOptions(policy, slots, scope, queue, pinned, expert_bytes, prefetch_rule="always"),
                   schedule)
    cache, tier = run_cache(trace, policy, slots, scope, schedule, queue, pinned)
    (_, replay_log), (cache_state, cache_log) = journal  # replay ran first
    assert cache_state is cache.state
    assert cache_log == replay_log
    kinds = {event[0] for event in replay_log}
    assert {"hit", "miss", "load"} <= kinds and "abort" not in kinds
    if depth is not None and queue > 0:
        assert "prefetch" in kinds
    got = cache.state.stats.as_dict()
    want = sim.stats.as_dict()
    for d in (got, want):  # replay measures no time; its tier is unnamed
        d.pop("stall_s")
        d["bytes_moved"] = sum(d["bytes_moved"].values())
    assert got == want
    # Every demand load, streamed miss, prefetch and pinned load read the slow tier once.
    assert len(tier.reads) == want["loads"] + len(pinned)


class Fixed:
    """A measurement that stays put (the runtime's read and layer times, for an exact replay)."""

    def __init__(self, value):
        self.value = value

    def add(self, x):
        pass


@pytest.mark.parametrize("seed, graded", [(0, False), (1, False), (0, True), (1, True)])
@pytest.mark.parametrize("cap, scope, depth", [(2, "per_layer", 1), (3, "per_layer", 2), (2, "global", 2)])
def test_replay_with_costs_and_the_cost_rule_take_the_same_decisions(journal, seed, graded, cap, scope, depth):
    from expert_cache.cost_model import PrefetchCosts

    trace = random_trace(seed, n=120, num_layers=L, num_experts=E)
    schedule = noisy_schedule(trace, depth, seed, graded)
    slots = pool_slots(cap, scope, L)
    read_s, layer_s = 0.001, 0.01  # every prefetch lands before the next layer: queue empty
    sim = simulate(BatchNeeds.from_trace(trace),
                   SimOptions("predictive", slots, scope, 8, costs=PrefetchCosts(read_s, layer_s)), schedule)
    cache, tier, src = ec_fakes.make_cache(L, E, slots, depth=depth, policy="predictive", scope=scope,
                                           prefetch_queue=8, prefetch_rule="cost")
    cache.prefetcher.transfer_s, cache.prefetcher.layer_s = Fixed(read_s), Fixed(layer_s)
    try:
        for s, (_, a, b) in enumerate(step_bounds(trace.steps)):
            for l in range(L):
                feed(src, schedule.forecasts[s][l], l, depth)
                topk = torch.from_numpy(trace.topk_ids[a:b, l]).long()
                ec_fakes.check_layer(cache, cache.prepare(l, topk), l, topk)
                cache.settle()
        stats = cache.stats()
    finally:
        cache.close()
    (_, replay_log), (cache_state, cache_log) = journal
    assert cache_log == replay_log
    assert stats["prefetches_issued"] == sim.stats.prefetches_issued > 0
    # The rule turned forecasts down that prefetching everything would have issued (both
    # without the loads budget, which caps either).
    needs = BatchNeeds.from_trace(trace)
    always, rule = (simulate(needs, SimOptions("predictive", slots, scope, 8, prefetch_loads_budget=None,
                                               **kw), schedule)
                    for kw in ({"prefetch_rule": "always"}, {"costs": PrefetchCosts(read_s, layer_s)}))
    assert always.stats.prefetches_issued >= rule.stats.prefetches_issued
    if scope == "global":  # (small per-layer pools are full of forecast keys either way)
        assert always.stats.prefetches_issued > sim.stats.prefetches_issued
    assert sim.modelled_s > 0 and sim.stats.stall_s >= 0
