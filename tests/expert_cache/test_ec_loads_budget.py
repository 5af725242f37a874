"""The prefetch loads budget (expert_cache/loads_budget.py): the pure room rule, and replay where
it keeps a predictive cache's loads within 1.1x a plain LRU cache's on the same accesses."""
import pytest

from ec_helpers import noisy_schedule, random_trace
from expert_cache.loads_budget import LoadsBudget, prefetch_room
from expert_cache.prefetch_switch import ShadowLRU
from expert_cache.simulator import BatchNeeds, SimOptions, simulate


@pytest.mark.parametrize("loads, lru, ratio, warmup, room", [
    (0, 0, 1.1, 8, 8),  # cold start: the warm-up lets the first forecast out whole
    (10, 10, 1.1, 8, 8),  # 1.1 x 10 = 11 < 10 + 8: the warm-up still decides
    (100, 100, 1.1, 8, 10),  # 1.1 x 100 = 110 > 108: the ratio decides
    (30, 30, 1.1, 0, 3),  # 1.1 x 30 is 33.000000000000004 in floating point: 3, not 2
    (109, 100, 1.1, 8, 1),
    (110, 100, 1.1, 8, 0),  # at the budget: nothing more
    (130, 100, 1.1, 8, 0),  # demand loads went past it: never negative
    (50, 40, 2.0, 0, 30),
    (5, 3, None, 8, None),  # no budget
    (5, 3, 0.0, 8, None),
])
def test_prefetch_room_is_what_keeps_loads_plus_one_within_the_budget(loads, lru, ratio, warmup, room):
    assert prefetch_room(loads, lru, ratio, warmup) == room


def test_the_budget_cuts_the_queue_limit_and_counts_the_shadow_lrus_loads():
    budget = LoadsBudget(ShadowLRU(lambda k: k[0], lambda pool: 1), 1.5, 0)
    assert budget.visit([(0, 1)]) == 1 and budget.visit([(0, 1)]) == 0 and budget.visit([(0, 2)]) == 1
    assert budget.lru_loads == 2
    assert budget.limit(loads=2, limit=8) == 1  # 1.5 x 2 = 3 loads at most
    assert budget.limit(loads=3, limit=8) == 0
    assert budget.limit(loads=0, limit=2) == 2  # room 3 > the queue's 2: the queue decides
    assert budget.stats() == {"prefetch_loads_budget": 1.5, "shadow_lru_loads": 2,
                              "prefetch_budget_bound_visits": 2}


@pytest.mark.parametrize("seed, depth, cap", [(0, 1, 3), (0, 1, 4), (1, 1, 4), (1, 2, 3)])
def test_replay_with_the_budget_loads_at_most_1_1x_lru_and_still_hits_more(seed, depth, cap):
    trace = random_trace(seed, n=120, num_layers=3, num_experts=6)
    needs, schedule = BatchNeeds.from_trace(trace), noisy_schedule(trace, depth, seed)
    lru = simulate(needs, SimOptions("lru", cap)).stats
    free, bound = (simulate(needs, SimOptions("predictive", cap, prefetch_loads_budget=b), schedule)
                   for b in (None, 1.1))
    assert free.stats.loads > 1.1 * lru.loads  # wrong forecasts: the cost rule alone reads more
    assert bound.stats.loads <= 1.1 * lru.loads
    assert bound.hit_rate >= lru.hit_rate
    # the shadow LRU fed in replay counts exactly what the LRU replay loaded
    assert bound.as_dict()["shadow_lru_loads"] == lru.loads
    assert free.budget is None and bound.budget["prefetch_budget_bound_visits"] > 0
