import numpy as np
import pytest

from ep_helpers import GROUPS_L0, GROUPS_L1, planted_ids
from moe_rt.errors import MoeRtError
from parallel.grouping import (GroupingOptions, add_replicas, coactivation_stats, layer_objective,
                               place_layer, plan_expert_groups)


def test_coactivation_stats_exact():
    ids = np.array([[[0, 1], [2, 0]],
                    [[0, 2], [2, 1]]], dtype=np.int32)
    s = coactivation_stats(ids, 3)
    assert s.load.tolist() == [[2, 1, 1], [1, 1, 2]]
    assert s.coact[0].tolist() == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert s.coact[1].tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 0]]
    assert s.affinity.tolist() == [[[1, 1, 2], [1, 0, 1], [0, 1, 1]]]


def _pairs(e, weights):
    c = np.zeros((e, e), dtype=np.int64)
    for (a, b), v in weights.items():
        c[a, b] = c[b, a] = v
    return c


def test_place_layer_swaps_to_the_strong_pairs():
    c = _pairs(4, {(0, 3): 10, (1, 2): 10, (0, 1): 1})
    load = np.array([5, 5, 5, 5])
    # Greedy alone gives {0, 1} {2, 3} (objective 1); one swap reaches {1, 2} {0, 3}. Swapping
    # 0<->2 or 1<->3 gains the same; the first pair in index order wins.
    rank_of = place_layer(c, load, np.zeros((4, 2)), 2, None, max_swaps=16)
    assert rank_of.tolist() == [1, 0, 0, 1]
    assert layer_objective(c, np.zeros((4, 2)), rank_of) == 20
    assert place_layer(c, load, np.zeros((4, 2)), 2, None, max_swaps=0).tolist() == [0, 0, 1, 1]


def test_place_layer_follows_the_cross_layer_term():
    c = _pairs(4, {(0, 3): 10, (1, 2): 10, (0, 1): 1})
    linear = np.zeros((4, 2))
    linear[0, 0] = 100  # tokens arrive on rank 0 from experts that are followed by expert 0
    rank_of = place_layer(c, np.array([5, 5, 5, 5]), linear, 2, None, max_swaps=16)
    assert rank_of.tolist() == [0, 1, 1, 0]  # now the 1<->3 swap, keeping 0 on rank 0


def test_place_layer_respects_load_tolerance():
    c = _pairs(4, {(0, 1): 10})
    load = np.array([10, 10, 1, 1])
    # Together experts 0 and 1 would carry 20 of 22 tokens on one rank; the cap is 1.1 * 11.
    assert place_layer(c, load, np.zeros((4, 2)), 2, 0.1, 16).tolist() == [0, 1, 0, 1]
    assert place_layer(c, load, np.zeros((4, 2)), 2, None, 16).tolist() == [0, 0, 1, 1]


def test_add_replicas_goes_where_needed_within_capacity():
    rank_of = np.array([0, 0, 1, 1])
    load = np.array([5, 1, 1, 4])
    need = np.array([[0, 3], [0, 0], [0, 0], [0, 0]], dtype=float)
    assert add_replicas(rank_of, load, need, 1, 3) == {0: [0, 1], 1: [0], 2: [1], 3: [1]}
    # Expert 3 is next hottest but no rank needs it: no useless copy.
    assert add_replicas(rank_of, load, need, 2, 3) == {0: [0, 1], 1: [0], 2: [1], 3: [1]}
    # Rank 1 is full.
    assert add_replicas(rank_of, load, need, 1, 2) == {0: [0], 1: [0], 2: [1], 3: [1]}


def test_planner_groups_planted_experts_across_layers():
    p = plan_expert_groups(planted_ids(), 8, GroupingOptions(ranks=4))
    p.validate_against(2, 8)
    rank = p.primary_table()
    for g0, g1 in zip(GROUPS_L0, GROUPS_L1):
        assert rank[0, g0[0]] == rank[0, g0[1]]  # one layer's pair together
        assert rank[1, g1[0]] == rank[1, g1[1]]
        assert rank[1, g1[0]] == rank[0, g0[0]]  # and where the token's previous experts were
    for l in range(2):
        assert np.bincount(rank[l], minlength=4).tolist() == [2, 2, 2, 2]
    assert p.planner == "s-EG" and p.num_replicas() == 0


def test_planner_balances_count_and_load_and_is_deterministic():
    rng = np.random.default_rng(1)
    first = rng.integers(0, 32, size=(2000, 3, 1))
    ids = np.concatenate([first, (first + rng.integers(1, 4, size=first.shape)) % 32], axis=-1)
    opts = GroupingOptions(ranks=4, load_tolerance=0.1)
    p = plan_expert_groups(ids, 32, opts)
    assert p == plan_expert_groups(ids, 32, opts)
    load = coactivation_stats(ids, 32).load
    rank = p.primary_table()
    for l in range(3):
        assert np.bincount(rank[l], minlength=4).tolist() == [8] * 4
        rank_load = np.bincount(rank[l], weights=load[l], minlength=4)
        assert rank_load.max() <= 1.1 * load[l].sum() / 4


def test_planner_replicas_respect_capacity():
    rng = np.random.default_rng(2)
    ids = np.stack([rng.permutation(16)[:2] for _ in range(500)])[:, None, :].repeat(2, axis=1)
    p = plan_expert_groups(ids, 16, GroupingOptions(ranks=4, replicas=4))
    assert p.capacity_per_rank == 5  # 16/4 + ceil(4/4)
    assert 0 < p.num_replicas() <= 8
    for l in range(2):
        slots = [len(p.experts_on_rank(l, r)) for r in range(4)]
        assert max(slots) <= 5 and sum(slots) == 16 + sum(len(v) - 1 for v in p.layers[l].values())


@pytest.mark.parametrize("ids, opts, msg", [
    (planted_ids(), GroupingOptions(ranks=3), "3 ranks do not divide 8 experts"),
    (planted_ids() + 4, GroupingOptions(ranks=4), r"outside \[0, 8\)"),
    (np.zeros((2, 1, 2), dtype=np.int32), GroupingOptions(ranks=4), "repeats an expert"),
    (np.zeros((2, 2)), GroupingOptions(ranks=4), r"\[T, L, k\]"),
    (planted_ids(), GroupingOptions(ranks=4, replicas=-1), "replicas must be"),
    (planted_ids(), GroupingOptions(ranks=4, capacity_per_rank=1), "below the 2 experts"),
])
def test_planner_rejects_bad_input(ids, opts, msg):
    with pytest.raises(MoeRtError, match=msg):
        plan_expert_groups(ids, 8, opts)
