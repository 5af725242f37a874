"""The pure parts of expert-aware scheduling: grouping by forecast experts, the batch choice, the
starvation bound, the token route table."""
import random

import pytest
import torch

from moe_rt.engine.decode_policy import BatchChooser, RouteRecord, TokenRouteTable, choose_batch
from moe_rt.engine.expert_groups import WARM_COST, greedy_groups, grow_group, marginal_cost, union_sizes


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


@pytest.mark.parametrize("size,max_skips", [(1, 1), (2, 3), (3, 2), (4, 7), (1, 5)])
def test_no_sequence_waits_more_than_max_skips_steps(size, max_skips):
    """Random routes that change every step, sequences arriving and leaving: the longest run of
    steps any sequence is left out never exceeds max_skips."""
    rng = random.Random(size * 10 + max_skips)
    chooser = BatchChooser(2, size, max_skips)
    running, next_id, waited = [], 0, {}
    for _ in range(300):
        while len(running) < 9 and rng.random() < 0.5:
            running.append(next_id)
            next_id += 1
        routes = {i: R(set(rng.sample(range(8), 2)), set(rng.sample(range(8), 2))) for i in running}
        chosen = chooser.choose(list(running), routes, R(set(rng.sample(range(8), 3)), set()))
        assert bool(chosen) == bool(running) and set(chosen) <= set(running)
        for i in running:
            waited[i] = 0 if i in chosen else waited.get(i, 0) + 1
            assert waited[i] <= max_skips
        for i in list(running):
            if i in chosen and rng.random() < 0.05:
                running.remove(i)
                chooser.forget(i)
    assert chooser.max_skips_seen <= max_skips
    assert chooser.stats()["decode_steps"] > 200


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
