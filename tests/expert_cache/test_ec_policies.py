"""Exact expected victims for each pure eviction policy."""
import pytest

from expert_cache.policies import (PolicyInputs, Prediction, belady_keep, choose_victims,
                                   eviction_candidates, eviction_order, should_displace)

A, B, C, D = (0, 0), (0, 1), (0, 2), (1, 3)


def test_candidates_exclude_pinned_in_flight_and_needed():
    got = eviction_candidates([D, C, B, A], pinned=[A], in_flight=[B], needed=[C])
    assert got == [D]
    assert eviction_candidates([A, B], pinned=[A, B]) == []


def test_lru_evicts_least_recent_and_unused_first():
    inp = PolicyInputs(last_use={A: 5, B: 2, C: 9})  # D never used -> last use -1
    assert eviction_order("lru", [A, B, C, D], inp) == [D, B, A, C]
    assert choose_victims("lru", [A, B, C, D], 2, inp) == [D, B]
    assert choose_victims("lru", [A, B, C], 1, inp) == [B]


def test_lfu_evicts_fewest_uses_ties_by_lru():
    inp = PolicyInputs(last_use={A: 1, B: 7, C: 3, D: 4}, use_count={A: 4, B: 1, C: 1, D: 2})
    # B and C both used once: C is older.
    assert eviction_order("lfu", [A, B, C, D], inp) == [C, B, D, A]
    assert choose_victims("lfu", [A, B, C, D], 1, inp) == [C]


def test_predictive_unpredicted_first_then_furthest_then_lowest_score():
    inp = PolicyInputs(
        last_use={A: 9, B: 1, C: 5, D: 3},
        predicted={A: Prediction(1, 3.0), C: Prediction(2, 5.0), D: Prediction(1, 1.0)})
    # B unpredicted -> first; C furthest (distance 2); D before A: same distance, lower score.
    assert eviction_order("predictive", [A, B, C, D], inp) == [B, C, D, A]


def test_predictive_ties_broken_by_lru():
    inp = PolicyInputs(last_use={A: 4, B: 2, C: 8, D: 0},
                       predicted={A: Prediction(1, 2.0), B: Prediction(1, 2.0)})
    # C, D unpredicted: D older. A, B same forecast: B older.
    assert eviction_order("predictive", [A, B, C, D], inp) == [D, C, B, A]


def test_predictive_without_a_forecast_is_lru_order():
    """With no forecast in force the predictive policy ranks by LRU's (cheaper) key, which is valid
    because predictive_key itself gives LRU's order then."""
    from expert_cache.policies import predictive_key

    inp = PolicyInputs(last_use={A: 5, B: 2, C: 9, D: 2})
    keys = [A, B, C, D, (1, 0), (2, 7)]
    assert sorted(keys, key=predictive_key(inp)) == eviction_order("lru", keys, inp)
    assert eviction_order("predictive", keys, inp) == eviction_order("lru", keys, inp)
    assert eviction_order("predictive", keys, inp)[:3] == [(1, 0), (2, 7), B]


def test_belady_evicts_furthest_next_use_never_used_first():
    inp = PolicyInputs(last_use={A: 3, B: 1, C: 2, D: 0}, next_use={A: 10, B: 12, C: 11})
    # D is never used again.
    assert eviction_order("belady", [A, B, C, D], inp) == [D, B, C, A]
    both_never = PolicyInputs(last_use={A: 3, B: 1})
    assert choose_victims("belady", [A, B], 1, both_never) == [B]


def test_victims_capped_by_candidates_and_only_candidates():
    inp = PolicyInputs(last_use={A: 1, B: 0})
    assert choose_victims("lru", [A], 3, inp) == [A]
    assert choose_victims("lru", [], 1, inp) == []
    # B (oldest) is pinned, so it is not a candidate and cannot be chosen.
    cands = eviction_candidates([A, B], pinned=[B])
    assert choose_victims("lru", cands, 1, inp) == [A]


def test_unknown_policy_and_negative_count_raise():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        choose_victims("fifo", [A], 1, PolicyInputs())
    with pytest.raises(ValueError):
        choose_victims("lru", [A], -1, PolicyInputs())


def test_belady_keep_soonest_next_use_resident_wins_ties():
    inp = PolicyInputs(next_use={A: 10, C: 5})  # B and D never used again
    assert belady_keep([A, B], [C, D], 2, inp) == {C, A}  # D streamed, B evicted
    assert belady_keep([A, B], [C, D], 3, inp) == {C, A, B}  # B and D tie: resident B stays
    assert belady_keep([A, B], [C], 0, inp) == set()


def test_prefetch_only_displaces_less_valuable_forecasts():
    inp = PolicyInputs(predicted={A: Prediction(2, 3.0), B: Prediction(1, 1.0)})
    near = Prediction(1, 2.0)
    assert should_displace(near, C, inp) is True  # C unpredicted
    assert should_displace(near, A, inp) is True  # A further away
    assert should_displace(near, B, inp) is True  # same distance, higher score
    assert should_displace(Prediction(1, 1.0), B, inp) is False  # equal: no churn
    assert should_displace(Prediction(2, 9.0), B, inp) is False  # further than B


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive", "belady"])
def test_single_victim_fast_path_agrees_with_full_order(policy):
    import random

    rng = random.Random(policy)
    keys = [(l, e) for l in range(3) for e in range(5)]
    for _ in range(50):
        sub = rng.sample(keys, 6)
        inp = PolicyInputs(
            last_use={k: rng.randrange(4) for k in sub if rng.random() < 0.8},
            use_count={k: rng.randrange(3) for k in sub},
            predicted={k: Prediction(rng.randrange(1, 3), float(rng.randrange(2)))
                       for k in sub if rng.random() < 0.5},
            next_use={k: rng.randrange(10) for k in sub if rng.random() < 0.7})
        assert choose_victims(policy, sub, 1, inp) == eviction_order(policy, sub, inp)[:1]
