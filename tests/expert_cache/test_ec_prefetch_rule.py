"""The forecast-driven eviction order, the bandwidth-aware prefetch rule and replay's link clock:
pure functions with exact expected outputs."""
import math

import pytest

from expert_cache.cost_model import (PrefetchCosts, hidden_seconds, lookahead_depth, prefetch_gain,
                                     prefetch_threshold)
from expert_cache.forecast import ForecastAccuracy, with_probabilities
from expert_cache.link_clock import LinkClock
from expert_cache.planning import Load, plan_prefetch
from expert_cache.policies import (PolicyInputs, Position, Prediction, eviction_order, forecast_next_use,
                                   should_displace)
from expert_cache.state import CacheState
from moe_rt.errors import MoeRtError

POS = Position(layer=1, num_layers=4, horizon=1)  # layer 1 routed; forecast covers layer 2


def test_forecast_next_use_per_case():
    pred = {(2, 0): Prediction(1, 1.0, 0.75), (2, 1): Prediction(1, 1.0)}
    assert forecast_next_use((2, 0), POS, pred) == 1 + 0.25 * 4  # forecast, p = 0.75
    assert forecast_next_use((2, 1), POS, pred) == 1  # forecast, no probability: certain
    assert forecast_next_use((2, 5), POS, pred) == 1 + 4  # inside the horizon, unforecast
    assert forecast_next_use((3, 5), POS, pred) == 2  # beyond the horizon: earliest use
    assert forecast_next_use((0, 5), POS, pred) == 3
    assert forecast_next_use((1, 5), POS, pred) == 4  # the layer just routed: next step


def test_predictive_with_position_evicts_furthest_expected_use_across_layers():
    a, b, c, d, e = (2, 0), (2, 1), (3, 0), (0, 0), (2, 2)
    inp = PolicyInputs(last_use={a: 5, b: 9, c: 1, d: 7, e: 3},
                       predicted={a: Prediction(1, 1.0, 0.5), b: Prediction(1, 1.0, 0.9)},
                       position=POS)
    # e: 5 (unforecast in the horizon); d: 3; a: 1 + 0.5*4 = 3 (d, a tie: fewer votes first,
    # d has none); c: 2; b: 1.4.
    assert eviction_order("predictive", [a, b, c, d, e], inp) == [e, d, a, c, b]
    # Without a position the order is the distance rule (unforecast first, by LRU).
    assert eviction_order("predictive", [a, b, c, d, e],
                          PolicyInputs(inp.last_use, predicted=inp.predicted)) == [c, e, d, a, b]


def test_should_displace_by_expected_use_with_position():
    inp = PolicyInputs(predicted={(2, 0): Prediction(1, 1.0, 0.9)}, position=POS)
    assert should_displace(Prediction(1, 1.0, 0.95), (2, 0), inp) is True  # 1.2 < 1.4
    assert should_displace(Prediction(1, 1.0, 0.5), (2, 0), inp) is False  # 3 > 1.4
    assert should_displace(Prediction(1, 1.0, 0.5), (3, 4), inp) is False  # 3 vs 2: keep (3, 4)
    assert should_displace(Prediction(1, 1.0, 0.8), (3, 4), inp) is True  # 1.8 < 2


def test_hidden_gain_and_threshold():
    c = PrefetchCosts(read_s=2.0, layer_s=1.0)
    assert hidden_seconds(1, 0, c) == 1.0  # half of the read lands before its layer
    assert hidden_seconds(3, 0, c) == 2.0  # all of it
    assert hidden_seconds(3, 1, c) == 1.0  # one read ahead of it in the queue
    assert hidden_seconds(1, 2, c) == 0.0  # lands after its layer: saves nothing
    busy = PrefetchCosts(read_s=2.0, layer_s=1.0, demand_per_layer=0.5)
    assert hidden_seconds(1, 0, busy) == 1.0  # no layer in between
    assert hidden_seconds(3, 0, busy) == 1.0  # 3 layer-times, 2 x 0.5 demand reads first
    assert hidden_seconds(3, 1, busy) == 0.0
    # p * hidden - (1 - p) * read * (1 + v)
    assert prefetch_gain(0.8, 3, 0, None, c) == pytest.approx(0.8 * 2 - 0.2 * 2)
    assert prefetch_gain(0.8, 3, 0, 0.5, c) == pytest.approx(0.8 * 2 - 0.2 * 2 * 1.5)
    assert prefetch_gain(0.99, 1, 2, None, c) < 0  # nothing hidden: never worth it
    assert prefetch_threshold(3, 0, None, c) == pytest.approx(0.5)  # fully hidden, free slot
    assert prefetch_threshold(3, 0, 1.0, c) == pytest.approx(4 / 6)
    assert prefetch_threshold(1, 2, None, c) == 1.0
    for p in (0.3, 0.5, 0.7):  # the threshold is where the gain changes sign
        t = prefetch_threshold(2, 1, 0.25, c)
        assert (prefetch_gain(p, 2, 1, 0.25, c) > 0) == (p > t)
    with pytest.raises(MoeRtError):
        PrefetchCosts(read_s=1.0, layer_s=1.0, victim_reuse=1.5)


def test_lookahead_depth_from_expected_loads():
    assert lookahead_depth(None, 0.01, 0.01, 4) == 1  # not measured yet
    assert lookahead_depth(2.0, 0.03, 0.01, 4) == 4  # 6 layer-times, capped
    assert lookahead_depth(2.0, 0.004, 0.01, 4) == 1
    assert lookahead_depth(1.5, 0.01, 0.01, 4) == 2


def test_forecast_accuracy_calibrates_votes_into_probabilities():
    acc = ForecastAccuracy(alpha=0.5)
    assert acc.precision(1) == 1.0  # prior: trusted until measured
    acc.record({(1, 0): Prediction(1, 2.0), (1, 1): Prediction(1, 2.0), (2, 3): Prediction(2, 1.0)})
    acc.observe(1, [(1, 0), (1, 5)])  # 2 of 4 votes at distance 1 were right
    assert acc.precision(1) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert acc.precision(2) == 1.0  # layer 2 has not run yet
    acc.observe(2, [(2, 4)])
    assert acc.precision(2) == pytest.approx(0.5)
    acc.observe(3, [(3, 0)])  # nothing forecast for layer 3: no change
    acc.record({(1, 0): Prediction(1, 50.0), (1, 1): Prediction(1, 50.0)})
    acc.observe(1, [(1, 0), (1, 1)])  # a visit weighs the same whatever its votes
    assert acc.precision(1) == pytest.approx(0.5 * 0.75 + 0.5 * 1.0)
    assert acc.visits == {1: 2, 2: 1}
    got = with_probabilities({(3, 1): Prediction(1, 1.0), (3, 2): Prediction(1, 2.0),
                              (4, 0): Prediction(2, 1.0)}, acc)
    q1 = 0.875
    assert got[(3, 1)].prob == pytest.approx(q1)
    assert got[(3, 2)].prob == pytest.approx(1 - (1 - q1) ** 2)  # two votes: either may be right
    assert got[(4, 0)].prob == pytest.approx(0.5)
    assert with_probabilities({(3, 1): Prediction(1, 1.0)}, None)[(3, 1)].prob == 1.0


def full_pool(slots=2, layers=3):
    s = CacheState(num_layers=layers, capacity_slots=slots)
    for e in range(slots):
        s.admit((2, e), now=e)
    return s


def test_plan_prefetch_with_costs_declines_what_does_not_pay():
    costs = PrefetchCosts(read_s=1.0, layer_s=1.0, queued=0, victim_reuse=0.5)
    empty = CacheState(num_layers=3, capacity_slots=2)
    fc = {(2, 5): Prediction(1, 1.0, 0.6), (2, 6): Prediction(1, 1.0, 0.4)}
    # Free slots: p > 0.5 pays (0.6 - 0.4 > 0), p = 0.4 does not.
    plan = plan_prefetch(empty, [(2, 5), (2, 6)], fc, 8, POS, costs)
    assert plan.loads == (Load((2, 5), 0),)
    # A full pool: the victim's reuse raises the bar: 0.6 - 0.4 * 1.5 = 0 does not pay.
    assert plan_prefetch(full_pool(), [(2, 5)], fc, 8, POS, costs).loads == ()
    sure = {(2, 5): Prediction(1, 1.0, 0.9)}
    assert plan_prefetch(full_pool(), [(2, 5)], sure, 8, POS, costs).loads == (Load((2, 5), 0, (2, 0)),)
    # The queue ahead: with two reads ahead and one layer-time, it would land after its layer.
    late = PrefetchCosts(read_s=1.0, layer_s=1.0, queued=2)
    assert plan_prefetch(empty, [(2, 5)], sure, 8, POS, late).loads == ()
    # Loads planned before it count as queued: the second of two sure keys lands too late.
    two = {(2, 5): Prediction(1, 1.0, 0.9), (2, 6): Prediction(1, 1.0, 0.9)}
    assert [l.key for l in plan_prefetch(empty, [(2, 5), (2, 6)], two, 8, POS, costs).loads] == [(2, 5)]
    # Without costs every forecast key that may displace is issued (prefetch_rule always).
    assert len(plan_prefetch(empty, [(2, 5), (2, 6)], fc, 8, POS, None).loads) == 2


def test_victim_reuse_counts_early_reloads():
    s = CacheState(num_layers=2, capacity_slots=1)
    assert s.victim_reuse() == 0.5  # the prior
    s.access((0, 0), 0)
    s.admit((0, 0), 0)
    s.access((0, 1), 2)
    s.evict((0, 0))  # stamped at tick 2
    s.admit((0, 1), 2)
    s.access((0, 0), 4)  # missed 2 visits later (<= L = 2): an early reload
    assert s.stats.early_reloads == 1
    assert s.victim_reuse() == pytest.approx((1 + 0.5 * 4) / (1 + 4))
    s.evict((0, 1))  # stamped at 4
    s.access((0, 1), 9)  # 5 visits later: not early
    assert s.stats.early_reloads == 1


def test_link_clock_stalls_demand_reads_and_late_prefetches():
    clock = LinkClock(read_s=2.0, layer_s=1.0)
    assert clock.begin_layer(0, [(0, 0)], demand_reads=1) == 2.0  # a miss: one read, t 0..2
    clock.issue([(1, 0), (2, 9)])  # queued at t=2: (1, 0) reads 2..4, (2, 9) waits for the link
    clock.end_layer()  # t = 3
    # Layer 1 uses (1, 0), landing at 4: waits 1.
    assert clock.begin_layer(1, [(1, 0)], demand_reads=0) == pytest.approx(1.0)
    clock.end_layer()  # t = 5; (2, 9) started at 4, lands at 6
    # A miss at layer 2 waits for the read in progress, then reads: 6..8.
    assert clock.begin_layer(2, [(2, 0)], demand_reads=1) == pytest.approx(3.0)
    assert clock.reads == 4 and clock.stall_s == pytest.approx(6.0)
    clock.issue([(0, 1), (0, 2)])  # t = 8: (0, 1) reads 8..10, (0, 2) queued behind it
    clock.end_layer()  # t = 9
    # Layer 0 uses (0, 1) (waits until 10); the queued (0, 2) it does not use is cancelled.
    assert clock.begin_layer(0, [(0, 1)], demand_reads=0) == pytest.approx(1.0)
    assert clock.reads == 5 and clock.queued() == 0
    # A queued prefetch of a key its layer uses is read at once, as a demand read.
    clock.issue([(1, 3)])
    assert clock.begin_layer(1, [(1, 3)], demand_reads=0) == pytest.approx(2.0)
    assert clock.reads == 6


@pytest.mark.parametrize("rule", ["cost", "always"])
def test_cache_stops_prefetching_from_a_forecaster_that_is_always_wrong(rule):
    import torch

    import ec_fakes

    L, E = 3, 8
    cache, tier, src = ec_fakes.make_cache(L, E, 4, prefetch_rule=rule)
    try:
        for _ in range(40):
            for l in range(L):
                if l + 1 < L:
                    src.forecast(l + 1, [6, 7])  # never used: every layer runs experts 0 and 1
                cache.prepare(l, torch.tensor([[0, 1]]))
                cache.settle()
        s = cache.stats()
    finally:
        cache.close()
    if rule == "always":  # every forecast key is loaded again after it was evicted
        assert s["prefetches_issued"] >= 4 and s["forecast_precision"][1] < 0.2
    else:
        # Once the measured precision falls to 1/2 no prefetch pays (a wasted read costs at
        # least what a right one can hide): about 14 wrong visits at alpha 0.05.
        assert s["prefetches_issued"] <= 4 and s["prefetches_declined"] > 0
        assert s["queued_reads_avg"] is not None and s["read_bytes_per_s"] > 0
    assert s["hits"] + s["misses"] == s["accesses"]


def test_reuse_rates_by_recency_and_their_effect_on_the_next_use_estimate():
    from expert_cache.planning import plan_demand

    s = CacheState(num_layers=2, capacity_slots=4)
    visits = [[(0, 0), (0, 1)], [(0, 0)], [(0, 0), (0, 1)]]  # visits of layer 0, 2 ticks apart
    for i, keys in enumerate(visits):
        s.apply_demand(plan_demand(s, keys, "lru"), now=2 * i)
    # Visit 2: (0,0) last used 1 step before: used; (0,1) 1 step before: unused.
    # Visit 3: (0,0) 1 step before: used; (0,1) 2 steps before: used.
    assert s.reuse_seen[:2] == [3, 1] and s.reuse_used[:2] == [2, 1]
    q = s.reuse_probabilities()
    assert q[0] == pytest.approx(3 / 5) and q[1] == pytest.approx(min(3 / 5, 2 / 3))
    assert q[2] == pytest.approx(min(q[1], 1 / 2)) and list(q) == sorted(q, reverse=True)
    pos = Position(layer=1, num_layers=4, horizon=1, now=20, reuse=(0.5, 0.25))
    # (3, 0) is 2 visits ahead, beyond the horizon; last used at 17 -> r = (20+2-17-1)//4 = 1.
    assert forecast_next_use((3, 0), pos, {}, last_use=17) == pytest.approx(2 + 4 * 0.75 / 0.25)
    assert forecast_next_use((3, 0), pos, {}, last_use=19) == pytest.approx(2 + 4 * 0.5 / 0.5)
    assert forecast_next_use((3, 0), pos, {}) == 2  # never used: the earliest use
