"""The shared planners with exact expected plans, and CacheState applying them."""
import random

import pytest

from expert_cache.forecast import prefetch_order
from expert_cache.planning import DemandPlan, Load, PrefetchPlan, plan_demand, plan_keep, plan_prefetch
from expert_cache.policies import Prediction, choose_victims, should_displace
from expert_cache.state import CacheState, CacheStateError


def full_layer(slots=3, layers=1, scope="per_layer"):
    """Layer 0 holds experts 0..slots-1 in slots 0..slots-1, used at ticks 0..slots-1."""
    s = CacheState(num_layers=layers, capacity_slots=slots, scope=scope)
    for e in range(slots):
        s.admit((0, e), now=e)
    return s


def test_demand_takes_free_slots_in_order_then_victims_by_policy():
    s = CacheState(num_layers=1, capacity_slots=3)
    s.admit((0, 9), now=0)
    plan = plan_demand(s, [(0, 9), (0, 1), (0, 2), (0, 3)], "lru")
    # Slots 1 and 2 are free; (0,3) must evict, but (0,9) is a key of this visit: streamed.
    assert plan == DemandPlan(keys=((0, 9), (0, 1), (0, 2), (0, 3)), hits=((0, 9),),
                              loads=(Load((0, 1), 1), Load((0, 2), 2)), streamed=((0, 3),))
    assert plan.misses == ((0, 1), (0, 2), (0, 3))
    assert s.entries.keys() == {(0, 9)}  # planning changes nothing


@pytest.mark.parametrize("policy, victims", [
    ("lru", [(0, 0), (0, 2)]),  # least recent first (ticks 0, 2, 5)
    ("lfu", [(0, 2), (0, 1)]),  # 2 was never accessed, 1 once, 0 twice
])
def test_demand_victims_follow_the_policy_and_are_never_chosen_twice(policy, victims):
    s = full_layer()
    for key, now in [((0, 0), 3), ((0, 0), 4), ((0, 1), 5)]:
        s.access(key, now)
    s.last_use[(0, 0)] = 0  # make LRU and LFU disagree
    plan = plan_demand(s, [(0, 7), (0, 8)], policy)
    assert [l.victim for l in plan.loads] == victims
    assert [l.slot for l in plan.loads] == [s.slot_of(v) for v in victims]


def test_demand_never_evicts_pinned_in_flight_needed_or_skipped_keys():
    s = CacheState(num_layers=1, capacity_slots=4)
    s.pin((0, 0))
    s.admit((0, 1), now=0, in_flight=True)
    s.admit((0, 2), now=0)
    s.admit((0, 3), now=9)
    s.mark_needed([(0, 2)])  # e.g. a layer still running
    plan = plan_demand(s, [(0, 3), (0, 5), (0, 6), (0, 7)], "lru", skip=[(0, 6)])
    # Only (0,3) is a candidate, and it is this visit's hit: nothing may go.
    assert plan.loads == () and plan.streamed == ((0, 5), (0, 7)) and plan.skipped == ((0, 6),)
    s.clear_needed()
    plan = plan_demand(s, [(0, 5)], "lru")
    assert plan.loads == (Load((0, 5), s.slot_of((0, 2)), (0, 2)),)


def test_predictive_demand_keeps_the_forecast():
    s = full_layer()
    predicted = {(0, 0): Prediction(1, 2.0), (0, 1): Prediction(2, 5.0)}
    plan = plan_demand(s, [(0, 7), (0, 8)], "predictive", predicted)
    # Unforecast (0,2) first, then the further forecast (0,1); (0,0) is forecast nearest.
    assert [l.victim for l in plan.loads] == [(0, 2), (0, 1)]


def test_global_pool_plans_slots_across_layers():
    s = CacheState(num_layers=2, capacity_slots=2, scope="global")
    s.admit((0, 0), now=0)
    plan = plan_demand(s, [(1, 4), (1, 5)], "lru")
    assert plan.loads == (Load((1, 4), 1), Load((1, 5), 0, (0, 0)))


def test_prefetch_issues_up_to_the_limit_and_only_displaces_less_valuable_forecasts():
    s = full_layer(slots=2, layers=2, scope="global")
    predicted = {(1, 0): Prediction(1, 3.0), (1, 1): Prediction(1, 1.0),
                 (0, 0): Prediction(1, 2.0)}  # (0,1) unforecast
    order = [(1, 0), (1, 1)]
    # (1,0) displaces the unforecast (0,1); (1,1) would displace (0,0), forecast as near with
    # more votes: skipped, not issued.
    assert plan_prefetch(s, order, predicted, limit=8) == PrefetchPlan((Load((1, 0), 1, (0, 1)),))
    assert plan_prefetch(s, order, predicted, limit=0) == PrefetchPlan(())
    s2 = CacheState(num_layers=2, capacity_slots=3)
    fc = {(1, e): Prediction(1, 1.0) for e in range(3)}
    assert [l.key for l in plan_prefetch(s2, sorted(fc), fc, limit=2).loads] == [(1, 0), (1, 1)]


def test_prefetch_never_takes_the_slot_of_a_key_it_just_planned():
    s = CacheState(num_layers=2, capacity_slots=1)
    fc = {(1, 0): Prediction(1, 2.0), (1, 1): Prediction(2, 1.0)}
    plan = plan_prefetch(s, [(1, 0), (1, 1)], fc, limit=4)
    assert plan.loads == (Load((1, 0), 0),)


def test_applying_plans_counts_like_the_single_actions():
    s = CacheState(num_layers=1, capacity_slots=2, expert_bytes=10)
    s.admit((0, 0), now=0, prefetch=True)
    s.mark_needed([(0, 0), (0, 1), (0, 2)])
    plan = plan_demand(s, [(0, 0), (0, 1), (0, 2)], "lru")
    assert s.apply_demand(plan, now=1) == {(0, 0): "prefetch_hit", (0, 1): "miss", (0, 2): "miss"}
    st = s.stats
    assert (st.hits, st.misses, st.prefetch_hits, st.streamed_misses) == (1, 2, 1, 1)
    assert st.bytes_moved == {"cpu": 30} and s.slot_map(0, 4) == [0, 1, -1, -1]
    s.clear_needed()
    fc = {(0, 3): Prediction(1, 1.0)}
    s.apply_prefetch(plan_prefetch(s, [(0, 3)], fc, 4), now=2, in_flight=True)
    assert s.in_flight() == {(0, 3)} and s.slot_map(0, 4) == [-1, 1, -1, 0]
    assert (st.evictions, st.prefetches_issued) == (1, 2)
    s.check_consistent()


def test_a_stale_plan_is_refused():
    s = CacheState(num_layers=1, capacity_slots=2)
    plan = plan_demand(s, [(0, 1)], "lru")
    s.admit((0, 5), now=0)  # takes the slot the plan named
    with pytest.raises(CacheStateError, match="stale plan"):
        s.apply_demand(plan, now=1)


def test_keep_plan_is_belady_with_bypass():
    s = full_layer(slots=2)
    next_use = {(0, 0): 5.0, (0, 1): 9.0, (0, 7): 3.0}  # (0,8) never used again
    plan = plan_keep(s, [(0, 7), (0, 8)], next_use)
    assert (plan.evict, plan.admit, plan.streamed) == (((0, 1),), ((0, 7),), ((0, 8),))
    s.apply_keep(plan, now=2)
    assert set(s.entries) == {(0, 0), (0, 7)} and s.stats.streamed_misses == 1


def reference_prefetch(state, candidates, predicted, limit):
    """The plain loop plan_prefetch must equal: re-rank the pool for every candidate."""
    inputs = state.policy_inputs(predicted)
    free = {p: list(v) for p, v in state.free_slots.items()}
    taken, loads = set(), []
    for key in candidates:
        if len(loads) >= limit:
            break
        if key in state.entries or key in taken:
            continue
        pool = state.pool_of(key)
        if free[pool]:
            loads.append(Load(key, free[pool].pop()))
            taken.add(key)
            continue
        victims = choose_victims("predictive", state.candidates(pool) - taken, 1, inputs)
        if victims and should_displace(predicted[key], victims[0], inputs):
            loads.append(Load(key, state.entries[victims[0]].slot, victims[0]))
            taken |= {key, victims[0]}
    return tuple(loads)


@pytest.mark.parametrize("seed", range(40))
def test_prefetch_plan_equals_the_plain_loop_in_any_candidate_order(seed):
    rng = random.Random(seed)
    scope = rng.choice(["per_layer", "global"])
    s = CacheState(num_layers=3, capacity_slots=rng.randint(1, 5), scope=scope)
    keys = [(l, e) for l in range(3) for e in range(6)]
    for key in rng.sample(keys, 10):
        if s.can_admit(key):
            s.admit(key, now=rng.randint(0, 9), in_flight=rng.random() < 0.2)
    predicted = {k: Prediction(rng.randint(1, 3), float(rng.randint(1, 3)))
                 for k in rng.sample(keys, 12)}
    order = prefetch_order(predicted, s.entries, len(predicted))
    for candidates in (order, rng.sample(order, len(order))):
        for limit in (1, 3, 20):
            want = reference_prefetch(s, candidates, predicted, limit)
            assert plan_prefetch(s, candidates, predicted, limit).loads == want
