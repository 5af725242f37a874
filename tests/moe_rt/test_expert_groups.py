"""The pure parts of expert-aware scheduling: grouping by forecast experts, the batch choice, the
starvation bound, the token route table."""
import random

import pytest
import torch

from moe_rt.engine.decode_policy import BatchChooser, RouteRecord, TokenRouteTable, choose_batch
from moe_rt.engine.expert_groups import (MIN_GAIN, WARM_COST, StepCosts, fastest_group, greedy_groups, grow_group,
                                         marginal_cost, union_sizes)


def R(*layers):
    return [frozenset(x) for x in layers]


ROUTES = {  # two layers; 0, 2 and 4 share experts, 1 and 3 share others
    0: R({0, 1}, {5, 6}),
    1: R({2, 3}, {7, 8}),
    2: R({0, 1}, {5, 9}),
    3: R({2, 3}, {7, 8}),
    4: R({1, 0}, {6, 5}),
}


def test_marginal_cost_counts_new_experts_and_discounts_warm_ones():
    union = [{0}, {5}]
    assert marginal_cost(R({0, 1}, {5, 6}), union) == 2.0
    assert marginal_cost(R({0, 1}, {5, 6}), union, warm=R({1}, set())) == WARM_COST + 1.0
    assert marginal_cost(R({0}, {5}), union) == 0.0


def test_grow_group_takes_the_cheapest_candidates_in_order():
    assert grow_group([0], [1, 2, 3, 4], ROUTES, 3, 2) == [0, 4, 2]
    assert grow_group([1], [0, 2, 3, 4], ROUTES, 2, 2) == [1, 3]
    # the seed is kept whole even beyond the size
    assert grow_group([0, 1, 2], [3, 4], ROUTES, 2, 2) == [0, 1, 2]
    # a candidate without a route costs nothing: taken first
    assert grow_group([0], [1, 9], ROUTES, 2, 2) == [0, 9]


def test_grow_group_prefers_warm_experts():
    routes = {0: R({0}), 1: R({1}), 2: R({2})}
    assert grow_group([0], [1, 2], routes, 2, 1) == [0, 1]  # tie: earliest
    assert grow_group([0], [1, 2], routes, 2, 1, warm=R({2})) == [0, 2]


def test_greedy_groups_partitions_by_shared_experts():
    groups = greedy_groups([0, 1, 2, 3, 4], ROUTES, 3, 2)
    assert groups == [[0, 4, 2], [1, 3]]
    assert [union_sizes(g, ROUTES, 2) for g in groups] == [[2, 3], [2, 2]]
    with pytest.raises(ValueError):
        greedy_groups([0], ROUTES, 0, 2)


def test_greedy_groups_puts_every_item_in_one_group_under_the_cap():
    rng = random.Random(0)
    for _ in range(50):
        n, cap = rng.randint(1, 20), rng.randint(1, 6)
        routes = {i: R(set(rng.sample(range(8), 2)), set(rng.sample(range(8), 2))) for i in range(n)}
        groups = greedy_groups(list(range(n)), routes, cap, 2)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(n)) and all(1 <= len(g) <= cap for g in groups)


def test_choose_batch_forces_starved_sequences_and_keeps_candidate_order():
    ids = [0, 1, 2, 3, 4]
    assert choose_batch(ids, ROUTES, {}, 2, 3, 2) == [0, 4]
    # 1 and 3 waited 3 steps: both come, even past the size
    assert choose_batch(ids, ROUTES, {1: 3, 3: 3}, 1, 3, 2) == [1, 3]
    assert choose_batch(ids, ROUTES, {1: 3}, 3, 3, 2) == [0, 1, 3]


def _random_serving(chooser: BatchChooser, max_skips: int, seed: int, costs: StepCosts | None = None) -> int:
    """Random routes that change every step, sequences arriving and leaving: asserts that no
    sequence is left out more than max_skips steps in a row; returns the partial steps."""
    rng = random.Random(seed)
    running, next_id, waited, partial = [], 0, {}, 0
    for _ in range(300):
        while len(running) < 9 and rng.random() < 0.5:
            running.append(next_id)
            next_id += 1
        routes = {i: R(set(rng.sample(range(8), 2)), set(rng.sample(range(8), 2))) for i in running}
        known = R(set(rng.sample(range(8), 3)), set(rng.sample(range(8), 3)))  # warm, or resident
        chosen = (chooser.choose(list(running), routes, known) if costs is None
                  else chooser.choose(list(running), routes, None, costs, known))
        assert bool(chosen) == bool(running) and set(chosen) <= set(running)
        partial += len(chosen) < len(running)
        for i in running:
            waited[i] = 0 if i in chosen else waited.get(i, 0) + 1
            assert waited[i] <= max_skips
        for i in list(running):
            if i in chosen and rng.random() < 0.05:
                running.remove(i)
                chooser.forget(i)
    assert chooser.max_skips_seen <= max_skips
    assert chooser.stats()["decode_steps"] > 200
    return partial


@pytest.mark.parametrize("size,max_skips", [(1, 1), (2, 3), (3, 2), (4, 7), (1, 5)])
def test_no_sequence_waits_more_than_max_skips_steps(size, max_skips):
    _random_serving(BatchChooser(2, size, max_skips), max_skips, size * 10 + max_skips)


def test_token_route_table_learns_each_tokens_usual_experts():
    t = TokenRouteTable(vocab_size=10, num_layers=2, num_experts=6, top_k=2)
    assert t.predict(3) is None
    tokens = torch.tensor([3, 3, 3, 4])
    t.observe(0, tokens, torch.tensor([[1, 2], [1, 5], [2, 1], [0, -1]]))
    t.observe(1, tokens, torch.tensor([[4, 0], [4, 0], [3, 0], [5, 4]]))
    assert t.predict(3) == [frozenset({1, 2}), frozenset({0, 4})]
    assert t.predict(4) == [frozenset({0}), frozenset({4, 5})]  # -1 counts for nothing
    assert t.predict(11) is None and t.predict(-1) is None


def test_route_record_keeps_each_sequences_last_row_and_the_warm_set():
    rec = RouteRecord(2, TokenRouteTable(10, 2, 6, 2))
    seq_ids, tokens = torch.tensor([7, 7, 7, 8]), torch.tensor([1, 2, 3, 4])
    rec.observe(0, seq_ids, tokens, torch.tensor([[0, 1], [2, 3], [4, 5], [1, -1]]))
    rec.observe(1, seq_ids, tokens, torch.tensor([[0, 1], [2, 3], [3, 5], [0, 2]]))
    assert rec.routes[7] == R({4, 5}, {3, 5}) and rec.routes[8] == R({1}, {0, 2})
    assert rec.warm == R({0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 5})
    assert rec.predict(7, 9) == R({4, 5}, {3, 5})  # token 9 never seen: the last route
    assert rec.predict(7, 2) == R({2, 3}, {2, 3})  # token 2 seen once: its experts
    rec.forget(7)
    assert rec.predict(7, 9) is None


def test_marginal_cost_counts_resident_experts_as_free():
    assert marginal_cost(R({0, 1}, {5, 6}), [set(), set()], resident=R({1}, {5, 6})) == 1.0
    # resident beats warm: no load at all
    assert marginal_cost(R({1}, set()), [set(), set()], warm=R({1}, set()), resident=R({1}, set())) == 0.0


def test_fastest_group_takes_everything_when_loads_are_cheap():
    ids = [0, 1, 2, 3, 4]
    assert fastest_group([], ids, ROUTES, 2, StepCosts(1.0, 0.0, 0.01)) == [0, 4, 2, 1, 3]
    # loads dear but every smaller batch has as many loads per token as the whole: still everything
    assert sorted(fastest_group([], ids, ROUTES, 2, StepCosts(1.0, 0.0, 1.0))) == ids


def test_fastest_group_shrinks_to_resident_experts_when_loads_dominate():
    resident = R({2, 3}, {7, 8})  # 1 and 3 load nothing; the others 4 or 5 experts
    assert fastest_group([], [0, 1, 2, 3, 4], ROUTES, 2, StepCosts(1.0, 0.0, 1.0), resident) == [1, 3]
    # a per-token cost scales every size alike here: still [1, 3]
    assert fastest_group([], [0, 1, 2, 3, 4], ROUTES, 2, StepCosts(1.0, 5.0, 1.0), resident) == [1, 3]
    # cheap reads: the whole batch
    assert len(fastest_group([], [0, 1, 2, 3, 4], ROUTES, 2, StepCosts(1.0, 0.0, 0.01), resident)) == 5


def test_fastest_group_keeps_the_seed_and_needs_a_clear_gain():
    routes = {0: R({0}), 1: R({1}), 2: R({1}), 3: R({1}), 4: R({2})}
    # rates by size: 1/11, 2/21, 3/21, 4/21, 5/31: 4 is 1.23x the whole, and the seed stays
    assert fastest_group([0], [0, 1, 2, 3, 4], routes, 1, StepCosts(1.0, 0.0, 10.0)) == [0, 1, 2, 3]
    # ROUTES at dear reads: 3 of 5 is 1.08x the whole (3/5 vs 5/9 tokens per load), under MIN_GAIN
    assert MIN_GAIN > 1.08
    assert len(fastest_group([], [0, 1, 2, 3, 4], ROUTES, 2, StepCosts(1e-9, 0.0, 1.0))) == 5
    assert fastest_group([], [], ROUTES, 2, StepCosts(1.0, 0.0, 1.0)) == []
    # the seed alone is more than one id: never cut below it
    assert fastest_group([0, 1], [0, 1, 2, 3, 4], ROUTES, 2, StepCosts(1.0, 0.0, 100.0))[:2] == [0, 1]


def test_choose_batch_with_costs_forces_starved_sequences_and_picks_the_fastest():
    resident = R({2, 3}, {7, 8})
    costs = StepCosts(1.0, 0.0, 1.0)
    assert choose_batch([0, 1, 2, 3, 4], ROUTES, {}, None, 3, 2, costs=costs, resident=resident) == [1, 3]
    # 2 waited 3 steps: it comes, and once its experts load 0 and 4 cost at most one more: all
    assert choose_batch([0, 1, 2, 3, 4], ROUTES, {2: 3}, None, 3, 2, costs=costs, resident=resident) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("max_skips", [1, 2, 4])
def test_no_sequence_waits_more_than_max_skips_under_the_throughput_choice(max_skips):
    """Reads dominate and a few experts are resident, so the fastest batch is often small: the
    bound still holds for every sequence."""
    partial = _random_serving(BatchChooser(2, None, max_skips), max_skips, max_skips, StepCosts(0.1, 0.0, 1.0))
    assert partial > 50  # the choice really shrank batches
