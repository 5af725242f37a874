"""Replay on hand-made traces with exact counts, and bounds on random traces."""
import numpy as np
import pytest
import torch

from ec_helpers import random_trace, single_layer, trace_from_steps
from expert_cache.forecast import aggregate_scores, prefetch_order
from expert_cache.policies import Prediction
from expert_cache.simulator import (BatchNeeds, ForecastSchedule, SimOptions, hit_rate_curve,
                                    oracle_schedule, pool_slots, predict_schedule, simulate)
from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation, Predictor


def run(trace, policy, capacity, scope="per_layer", schedule=None, **kw):
    return simulate(BatchNeeds.from_trace(trace), SimOptions(policy, capacity, scope, **kw),
                    schedule).stats


def counts(stats):
    return stats.hits, stats.misses, stats.streamed_misses


def test_needs_are_the_union_over_the_batch():
    # step 0: tokens use {0,1} and {1,2}; step 1: one token uses {2,3}.
    tr = trace_from_steps([[[[0, 1]], [[1, 2]]], [[[2, 3]]]], num_experts=4)
    assert BatchNeeds.from_trace(tr).needs == (((0, 1, 2),), ((2, 3),))
    st = run(tr, "lru", 3)
    # 3 misses, then 2 hits and 3 misses evicting (0,0): ties on last use go to the smaller key.
    assert (st.hits, st.misses, st.accesses, st.evictions) == (1, 4, 5, 1)


@pytest.mark.parametrize("policy, expected", [
    ("lru", (2, 4, 0)),
    ("lfu", (2, 4, 0)),
    ("belady", (3, 3, 1)),  # 2 is never used again: streamed, keeping 0 and 1
])
def test_request_sequence_exact(policy, expected):
    assert counts(run(single_layer([0, 1, 0, 2, 0, 1], 4), policy, 2)) == expected


@pytest.mark.parametrize("policy, expected", [
    ("lru", (2, 4, 0)),  # 2 evicts 0 (least recent), then 0 misses
    ("lfu", (3, 3, 0)),  # 2 evicts 1 (used once), 0 (used 3x) stays
    ("belady", (3, 3, 1)),
])
def test_lfu_keeps_the_hot_expert(policy, expected):
    assert counts(run(single_layer([0, 0, 0, 1, 2, 0], 4), policy, 2)) == expected


def two_layer_trace():
    # steps: layer0/layer1 = {0}/{2}, {1}/{3}, {1}/{2}
    return trace_from_steps([[[[0], [2]]], [[[1], [3]]], [[[1], [2]]]], num_experts=4)


def test_predictive_with_oracle_prefetches_the_next_layer_exactly():
    tr = two_layer_trace()
    st = run(tr, "predictive", 1, schedule=oracle_schedule(tr, depth=1))
    assert (st.hits, st.misses, st.prefetch_hits, st.prefetches_issued) == (4, 2, 3, 3)
    assert (st.wasted_prefetches, st.evictions, st.loads) == (0, 3, 5)
    assert counts(run(tr, "lru", 1)) == (1, 5, 0)
    b = run(tr, "belady", 1)
    assert counts(b) == (2, 4, 1) and b.loads == 4 <= st.loads


def test_wrong_forecast_is_a_wasted_prefetch():
    tr = trace_from_steps([[[[0], [2]]]], num_experts=4)
    sched = ForecastSchedule(1, (({(1, 1): Prediction(1, 1.0)}, {}),))
    st = run(tr, "predictive", 1, schedule=sched, expert_bytes=7)
    assert (st.hits, st.misses, st.prefetches_issued, st.wasted_prefetches) == (0, 2, 1, 1)
    assert st.wasted_prefetch_bytes == 7 and st.bytes_moved == {"cpu": 21}


def test_prefetch_queue_bounds_prefetches_per_layer():
    tr = trace_from_steps([[[[0], [1]]]], num_experts=4)
    fc = {(1, 0): Prediction(1, 1.0), (1, 1): Prediction(1, 3.0), (1, 2): Prediction(1, 2.0)}
    st = run(tr, "predictive", 4, schedule=ForecastSchedule(1, ((fc, {}),)), prefetch_queue=2)
    assert (st.prefetches_issued, st.prefetch_hits, st.hits, st.misses) == (2, 1, 1, 1)
    assert prefetch_order(fc, set(), 2) == [(1, 1), (1, 2)]
    assert run(tr, "predictive", 4, schedule=ForecastSchedule(1, ((fc, {}),)),
               prefetch_queue=0).prefetches_issued == 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_pinned_expert_always_hits_and_is_never_evicted(policy):
    st = run(single_layer([0, 1, 0, 1], 2), policy, 1, pinned=((0, 0),))
    assert counts(st) == (2, 2, 2) and st.evictions == 0


def test_global_pool_lets_a_busy_layer_use_more_slots():
    # layer 0 cycles over 3 experts, layer 1 always uses expert 0.
    tr = trace_from_steps([[[[e], [0]]] for e in [0, 1, 2, 0, 1, 2]], num_experts=3)
    assert run(tr, "lru", 2, "per_layer").hits == 5  # layer 0 thrashes 3 experts in 2 slots
    assert run(tr, "lru", 4, "global").hits == 8  # same 4 slots in total: all of layer 0 fits
    assert pool_slots(2, "global", 2) == 4


def test_bad_options_raise():
    needs = BatchNeeds.from_trace(single_layer([0], 2))
    with pytest.raises(MoeRtError, match="needs a predictor"):
        simulate(needs, SimOptions("predictive", 1))
    with pytest.raises(MoeRtError, match="unknown policy"):
        simulate(needs, SimOptions("fifo", 1))
    with pytest.raises(MoeRtError, match=">= 1"):
        simulate(needs, SimOptions("lru", 0))
    with pytest.raises(MoeRtError, match="cannot pin"):
        simulate(needs, SimOptions("lru", 1, pinned=((0, 0), (0, 1))))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_belady_bounds_every_policy_on_random_traces(seed, scope):
    tr = random_trace(seed)
    needs = BatchNeeds.from_trace(tr)
    sched = oracle_schedule(tr, depth=2)
    for cap in range(1, tr.num_experts + 1):
        slots = pool_slots(cap, scope, tr.num_layers)
        bound = simulate(needs, SimOptions("belady", slots, scope)).stats
        for policy in ("lru", "lfu", "predictive"):
            st = simulate(needs, SimOptions(policy, slots, scope),
                          sched if policy == "predictive" else None).stats
            assert st.loads >= bound.loads, (policy, cap)
            if policy != "predictive":  # prefetch may beat Belady's hit rate, never its loads
                assert st.hit_rate <= bound.hit_rate, (policy, cap)


@pytest.mark.parametrize("seed", range(3))
def test_oracle_predictive_reaches_belady(seed):
    tr = random_trace(seed, n=40)
    needs = BatchNeeds.from_trace(tr)
    sched = oracle_schedule(tr, depth=1)
    # From 2 slots per layer on, each batch's layer needs fit after one eviction round.
    for cap in range(2, tr.num_experts + 1):
        lru = simulate(needs, SimOptions("lru", cap)).hit_rate
        oracle = simulate(needs, SimOptions("predictive", cap), sched).hit_rate
        bound = simulate(needs, SimOptions("belady", cap)).hit_rate
        assert oracle >= lru
        assert oracle >= bound - 0.02, (cap, oracle, bound)


def _grades(**picks):
    """A grade tuple from g<index>=count (router_predict.graded: 0-7 votes, 8-15 runner-ups)."""
    out = [0] * 16
    for name, n in picks.items():
        out[int(name[1:])] = n
    return tuple(out)


def test_aggregate_scores_counts_top_k_votes_and_grades_them():
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.0], [0.2, 0.8, 0.7, 0.1]]])  # [d=1, T=2, E=4]
    # softmax shares x E (1: a uniform router's): token 0 1.58 .71 1.06 .64 (votes 0, 2), token 1
    # .74 1.36 1.23 .67 (votes 1, 2); a vote's grade is its bucket (>= .8: 1), a runner-up's
    # (ranks 2-3) 8 + its bucket (< .8: 0)
    assert aggregate_scores(scores, top_k=2, first_layer=3) == {
        (3, 0): Prediction(1, 1.0, grades=_grades(g1=1, g8=1)),
        (3, 1): Prediction(1, 1.0, grades=_grades(g1=1, g8=1)),
        (3, 2): Prediction(1, 2.0, grades=_grades(g1=2)),
        (3, 3): Prediction(1, 0.0, grades=_grades(g8=2))}


class OraclePredictor(Predictor):
    """Looks up each token's real future experts by its position (unique per row in tests)."""

    name = "test-oracle"

    def __init__(self, trace):
        super().__init__(trace.num_layers, trace.num_experts, trace.top_k)
        self.ids = torch.from_numpy(trace.topk_ids).long()

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        d = min(depth, self.num_layers - 1 - obs.moe_index)
        rows = self.ids[obs.positions][:, obs.moe_index + 1: obs.moe_index + 1 + d]  # [T, d, k]
        scores = torch.zeros(rows.shape[0], d, self.num_experts)
        scores.scatter_(2, rows, 1.0)
        return scores.transpose(0, 1)


def test_predictor_schedule_matches_the_built_in_oracle():
    tr = random_trace(5, n=12, num_experts=8)
    for depth in (1, 2):
        got = predict_schedule(tr, OraclePredictor(tr), depth, progress=False)
        # the same votes; the predictor's forecasts also grade them and name runner-ups
        votes = tuple(tuple({k: Prediction(p.distance, p.score) for k, p in f.items() if p.score > 0}
                            for f in step) for step in got.forecasts)
        assert votes == oracle_schedule(tr, depth).forecasts
        assert all(sum(p.grades[:8]) == p.score for step in got.forecasts for f in step for p in f.values())


def test_predictor_problems_are_user_errors():
    tr = random_trace(0, n=4)

    class NeedsHidden(OraclePredictor):
        needs_hidden = True

    class WrongShape(OraclePredictor):
        def predict(self, obs, depth):
            return torch.zeros(1, 1, 1)

    with pytest.raises(MoeRtError, match="no `hidden`"):
        predict_schedule(tr, NeedsHidden(tr), 1, progress=False)
    with pytest.raises(MoeRtError, match="shape"):
        predict_schedule(tr, WrongShape(tr), 1, progress=False)


def test_hit_rate_curve_always_includes_belady_and_is_monotone_for_it():
    tr = random_trace(1)
    curve = hit_rate_curve(tr, [1, 2, 3, 6], ["lru"], progress=False)
    assert list(curve.results) == ["lru", "belady"]
    b = curve.hit_rates("belady")
    assert len(b) == 4 and b == sorted(b)
    assert all(l <= x for l, x in zip(curve.hit_rates("lru"), b))
    assert np.isclose(b[-1], curve.hit_rates("lru")[-1])  # everything fits: only cold misses
