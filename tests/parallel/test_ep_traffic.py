import numpy as np
import pytest

from ep_helpers import planted_ids
from moe_rt.errors import MoeRtError
from parallel.grouping import GroupingOptions, plan_expert_groups
from parallel.placement import default_placement, placement_from_section
from parallel.traffic import (TrafficOptions, balanced_home, compare_schemes, simulate,
                              uniform_home)

# 4 tokens, 2 layers, top-2 of 4 experts; default placement on 2 ranks: {0, 1} | {2, 3}.
HAND = np.array([[[0, 1], [2, 3]],
                 [[0, 2], [1, 3]],
                 [[0, 2], [0, 1]],
                 [[0, 1], [2, 3]]], dtype=np.int32)
OPTS = TrafficOptions(hidden=8, dtype_bytes=2)  # one row = 16 bytes


def test_uniform_home_splits_each_batch_evenly():
    assert uniform_home(np.array([0, 0, 0, 1, 1]), 2).tolist() == [0, 0, 1, 0, 1]
    assert uniform_home(np.zeros(4, dtype=np.int64), 2).tolist() == [0, 0, 1, 1]


def test_balanced_home_caps_tokens_per_rank():
    counts = np.array([[2, 0], [1, 1], [1, 1], [2, 0]])
    fallback = np.array([0, 0, 1, 1])
    batch = np.zeros(4, dtype=np.int64)
    # Ties go to the fallback; with cap ceil(1.0 * 4 / 2) = 2, token 3 finds rank 0 full.
    assert balanced_home(counts, batch, fallback, 0.0).tolist() == [0, 0, 1, 1]
    assert balanced_home(counts, batch, fallback, 1.0).tolist() == [0, 0, 1, 0]


def test_baseline_traffic_exact():
    r = simulate(HAND, default_placement(2, 4, 2), OPTS, speculative=False)
    # Layer 0 homes 0,0,1,1: token 0 all local; 1 and 2 send one expert away; token 3 sends
    # both experts to rank 0, one (token, rank) visit. 3 visits x (dispatch + combine).
    assert r.a2a_rows.tolist() == [6, 6]
    assert r.local_pairs.tolist() == [4, 3]
    assert r.a2a_bytes.tolist() == [96, 96]
    assert r.a2a_bytes_per_token == 48.0
    assert r.dense_rows.tolist() == [8, 8]  # 2 * (N - 1) * T
    assert r.collective_bytes_per_token == 112.0
    assert r.local_share == 7 / 16


def test_speculative_shuffle_exact():
    place = default_placement(2, 4, 2)
    # Model-free s-TS: layer 1 homes follow layer 0's experts -> 0, 0 (tie: uniform), 1 (tie), 0.
    loose = simulate(HAND, place, TrafficOptions(8, 2, token_cap_slack=1.0), speculative=True)
    assert loose.a2a_rows.tolist() == [6, 8] and loose.local_pairs.tolist() == [4, 1]
    # Cap 2 tokens per rank: token 3 is pushed to rank 1, where both its layer-1 experts live.
    tight = simulate(HAND, place, TrafficOptions(8, 2, token_cap_slack=0.0), speculative=True)
    assert tight.a2a_rows.tolist() == [6, 6] and tight.local_pairs.tolist() == [4, 3]
    # An oracle predictor (the true experts) makes every token with both experts on one rank local.
    oracle = simulate(HAND, place, TrafficOptions(8, 2, token_cap_slack=1.0), speculative=True,
                      predicted_ids=HAND)
    assert oracle.a2a_rows.tolist() == [4, 2] and oracle.local_pairs.tolist() == [6, 7]


def test_replica_on_home_rank_serves_locally():
    place = placement_from_section({"ranks": 2, "layers": {
        0: {0: [0, 1], 1: [0], 2: [1], 3: [1]}, 1: {0: [0], 1: [0], 2: [1], 3: [1]}}})
    r = simulate(HAND, place, OPTS, speculative=False)
    # Tokens 2 and 3 (home 1) now find expert 0 at home; token 3 still visits rank 0 for expert 1.
    assert r.a2a_rows.tolist() == [4, 6] and r.local_pairs.tolist() == [6, 3]


def test_planted_groups_cut_traffic():
    ids = planted_ids()
    steps = np.arange(len(ids)) // 8
    grouped = plan_expert_groups(ids, 8, GroupingOptions(ranks=4))
    reports = compare_schemes(ids, default_placement(2, 8, 4), grouped, OPTS, batch_ids=steps)
    base, sts, seg, both = (reports[k] for k in ("baseline", "s-TS", "s-EG", "s-TS+s-EG"))
    # Grouped pairs travel together: a token not at home makes one visit. Default placement:
    # every layer-0 pair is split (one visit each, the other half local), and 4 of 8 tokens of
    # a batch need two visits at layer 1.
    assert seg.a2a_rows.tolist() == [96, 96] and base.a2a_rows.tolist() == [128, 192]
    # Both: layer-1 experts sit where layer 0's were, and s-TS puts the token there.
    assert both.local_pairs.tolist() == [32, 128] and both.a2a_rows.tolist() == [96, 0]
    assert both.local_share > max(base.local_share, sts.local_share, seg.local_share)
    assert all(r.dense_rows.tolist() == [384, 384] for r in reports.values())


def test_bad_inputs():
    place = default_placement(2, 4, 2)
    with pytest.raises(MoeRtError, match=r"missing layer\(s\) \[1\]; the model has 2"):
        simulate(HAND, default_placement(1, 4, 2), OPTS, speculative=False)
    with pytest.raises(MoeRtError, match="predicted ids must be"):
        simulate(HAND, place, OPTS, speculative=True, predicted_ids=HAND[:2])
    with pytest.raises(MoeRtError, match="batch ids must have shape"):
        simulate(HAND, place, OPTS, speculative=False, batch_ids=np.zeros(3))
    with pytest.raises(MoeRtError, match="hidden and dtype bytes"):
        TrafficOptions(hidden=0)
