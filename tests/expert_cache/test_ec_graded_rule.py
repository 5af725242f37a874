"""Graded forecasts and the prefetch rule built on them: the grades a vote gets, their online
calibration, the victim terms of the rule, a wrong prefetch's recency, and a replay in which the
rule keeps loads within 1.1x LRU's where prefetching every forecast key does not."""
import numpy as np
import pytest
import torch

from expert_cache.cost_model import PrefetchCosts, bytes_only_costs, prefetch_gain, prefetch_threshold
from expert_cache.forecast import ForecastAccuracy, predictions, with_probabilities
from expert_cache.planning import Load, plan_prefetch, prefetches_to_drop
from expert_cache.policies import Position, Prediction
from expert_cache.simulator import BatchNeeds, ForecastSchedule, SimOptions, simulate
from expert_cache.state import CacheState
from router_predict.graded import NUM_GRADES, GradedForecast, grade_counts, vote_grades, votes_of

POS = Position(layer=1, num_layers=4, horizon=1)  # layer 1 routed; forecast covers layer 2


def grades(**picks):
    """A grade tuple from g<index>=count."""
    out = [0] * NUM_GRADES
    for name, n in picks.items():
        out[int(name[1:])] = n
    return tuple(out)


def test_vote_grades_bucket_shares_relative_to_uniform():
    # E = 4: a uniform share is 0.25; share x 4 against edges 0.8 1.6 3.2 4.8 6.4 8 11.2
    scores = torch.log(torch.tensor([[0.7, 0.1, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    ranked = [[0, 2, 1, 3], [0, 1, 2, 3]]  # k = 1 vote, then runner-ups
    # row 0: 2.8 -> 2, 0.6 -> 0 (runner-up: 8), 0.4 -> 8, 0.2 -> 8; row 1: 1.0 -> 1, then 9s
    assert vote_grades(scores, ranked, 1) == [[2, 8, 8, 8], [1, 9, 9, 9]]
    assert grade_counts(ranked, [[2, 8, 8, 8], [1, 9, 9, 9]]) == {
        0: grades(g2=1, g1=1), 2: grades(g8=1, g9=1), 1: grades(g8=1, g9=1), 3: grades(g8=1, g9=1)}
    assert votes_of(grades(g2=1, g1=1, g9=3)) == 2


def test_predictions_read_grades_and_keep_runner_ups_without_votes():
    f = GradedForecast(3, torch.tensor([1.0, 0.0, 0.0]), 1, {0: grades(g5=1), 2: grades(g9=1)})
    assert predictions(f) == {(3, 0): Prediction(1, 1.0, grades=grades(g5=1)),
                              (3, 2): Prediction(1, 0.0, grades=grades(g9=1))}
    # a runner-up is no forecast of use: a queued prefetch of it is withdrawn
    wrong, withdrawn = prefetches_to_drop([(3, 2), (3, 0)], 2, [], predictions(f))
    assert (wrong, withdrawn) == ([], [(3, 2)])


def test_graded_calibration_per_grade_and_layer():
    acc = ForecastAccuracy(alpha=0.5, decay=1.0, shrink=1.0)
    hi, lo = grades(g6=1), grades(g1=1)
    acc.record({(2, 0): Prediction(1, 1.0, grades=hi), (2, 1): Prediction(1, 1.0, grades=lo)})
    acc.observe(2, [(2, 0)])  # the high grade was right, the low one wrong
    assert acc.precision(1) == pytest.approx(0.75)  # 0.5 * 1 + 0.5 * 0.5
    # each pick weighs 1/2 (a visit weighs 1): grade 6 1/2 right of 1/2, grade 1 0 of 1/2,
    # shrunk by one pseudo-vote towards 0.75 over all layers, then layer 2 towards that
    pooled6, pooled1 = (0.5 + 0.75) / 1.5, 0.75 / 1.5
    q = acc.graded_precision(1, 2)
    assert q[6] == pytest.approx((0.5 + pooled6) / 1.5)
    assert q[1] == pytest.approx(pooled1 / 1.5)
    assert q[3] == pytest.approx(0.75)  # never seen: the distance's precision
    assert acc.graded_precision(1, 5)[6] == pytest.approx(pooled6)  # a layer not measured
    got = with_probabilities({(2, 7): Prediction(1, 2.0, grades=grades(g6=1, g1=1))}, acc)
    assert got[(2, 7)].prob == pytest.approx(1 - (1 - q[6]) * (1 - q[1]))


def test_gain_charges_a_victim_needed_now():
    c = bytes_only_costs()  # an idle link: a prefetch hides a whole read
    assert prefetch_gain(0.6, 1, 5, None, c) == pytest.approx(0.6 - 0.4)
    assert prefetch_gain(0.6, 1, 0, 0.5, c) == pytest.approx(0.6 - 0.4 * 1.5)
    # a victim used now with chance u: p - (1 - p) - 2u
    assert prefetch_gain(0.9, 1, 0, 0.0, c, victim_now=0.3) == pytest.approx(0.9 - 0.1 - 0.6)
    assert prefetch_threshold(1, 0, 0.0, c, victim_now=0.3) == pytest.approx(0.8)  # 1/2 + u
    assert prefetch_threshold(1, 0, 0.5, c) == pytest.approx(1.5 / 2.5)
    t = PrefetchCosts(read_s=2.0, layer_s=1.0)
    for p in (0.5, 0.7, 0.9):
        th = prefetch_threshold(1, 0, 0.2, t, victim_now=0.1)
        assert (prefetch_gain(p, 1, 0, 0.2, t, victim_now=0.1) > 0) == (p > th)


def test_plan_prefetch_weighs_the_victims_forecast_and_age():
    s = CacheState(num_layers=4, capacity_slots=1)
    s.admit((2, 0), now=1)
    c = bytes_only_costs()
    # the resident (2, 0) is forecast now at 0.3: a candidate needs p > 0.8
    fc = {(2, 0): Prediction(1, 1.0, 0.3), (2, 1): Prediction(1, 1.0, 0.75)}
    assert plan_prefetch(s, [(2, 1)], fc, 8, POS, c).loads == ()
    fc[(2, 1)] = Prediction(1, 1.0, 0.85)
    assert plan_prefetch(s, [(2, 1)], fc, 8, POS, c).loads == (Load((2, 1), 0, (2, 0)),)
    # unforecast: its reuse by age (Position.reuse) is v; 0.55 pays against v = 0.05 (0.525),
    # not against v = 0.5 (0.6)
    pos = Position(1, 4, 1, now=9, reuse=(0.5, 0.05))
    one = {(2, 1): Prediction(1, 1.0, 0.55)}
    assert plan_prefetch(s, [(2, 1)], one, 8, pos, c).loads == (Load((2, 1), 0, (2, 0)),)
    s.last_use[(2, 0)] = 8  # used last step: v = 0.5
    assert plan_prefetch(s, [(2, 1)], one, 8, pos, c).loads == ()


def test_a_wrong_prefetch_falls_back_to_its_last_use():
    from expert_cache.planning import DemandPlan

    s = CacheState(num_layers=1, capacity_slots=3)
    s.admit((0, 1), now=0)  # a demand load: last use 0
    s.apply_prefetch(plan_prefetch(s, [(0, 2)], {(0, 2): Prediction(1, 1.0)}, 8), now=5, in_flight=False)
    s.evict((0, 1))
    s.apply_prefetch(plan_prefetch(s, [(0, 1)], {(0, 1): Prediction(1, 1.0)}, 8), now=6, in_flight=False)
    assert s.last_use == {(0, 1): 6, (0, 2): 5}
    s.apply_demand(DemandPlan(((0, 3),), (), (), ((0, 3),)), now=7)  # neither used
    assert s.last_use == {(0, 1): 0, (0, 3): 7}  # (0, 2) was never used: least recent


def _noisy_schedule(needs: BatchNeeds, seed: int) -> ForecastSchedule:
    """After layer 0, for layer 1: a confident vote (grade 6), right 90% of the time, and a
    flat one (grade 1) for a random other expert, right about 1 time in 8."""
    rng = np.random.default_rng(seed)
    E = needs.num_experts
    out = []
    for step in needs.needs:
        true = step[1][0]
        sure = true if rng.random() < 0.9 else int(rng.integers(E))
        flat = int(rng.integers(E))
        f = {(1, sure): Prediction(1, 1.0, grades=grades(g6=1))}
        if flat != sure:
            f[(1, flat)] = Prediction(1, 1.0, grades=grades(g1=1))
        out.append((f, {}))
    return ForecastSchedule(1, tuple(out))


def test_replay_rule_keeps_loads_within_lru_where_prefetching_everything_does_not():
    rng = np.random.default_rng(0)
    E, S = 8, 400
    pop = rng.dirichlet(np.full(E, 0.7))
    needs = BatchNeeds(2, E, tuple(((int(rng.integers(E)),), (int(rng.choice(E, p=pop)),))
                                   for _ in range(S)))
    sched = _noisy_schedule(needs, 1)
    lru = simulate(needs, SimOptions("lru", 2)).stats
    old = simulate(needs, SimOptions("predictive", 2, prefetch_rule="always"), sched).stats
    new = simulate(needs, SimOptions("predictive", 2), sched).stats
    assert old.loads > 1.1 * lru.loads
    assert new.loads <= 1.1 * lru.loads
    assert new.hit_rate >= lru.hit_rate
