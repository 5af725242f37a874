import math

import numpy as np
import pytest
import torch

from router_predict.evaluate import (Counts, exact_set_accuracy, hit_counts, plot_recall_per_layer,
                                     precision_at_budget, ranked_experts, recall_at_k, replay)
from router_predict.registry import build_predictor
from rp_helpers import perm_chain_trace

SCORES = torch.tensor([[0.9, 0.1, 0.5, 0.0],   # top-2 {0, 2}, top-4 all
                       [0.2, 0.2, 0.8, 0.1]])  # top-2 {2, 0} (tie 0/1 -> 0), top-4 all
TRUE = torch.tensor([[0, 2], [1, 2]])


def test_ranking_ties_go_to_lower_id():
    assert ranked_experts(SCORES, 3).tolist() == [[0, 2, 1], [2, 0, 1]]
    assert hit_counts(SCORES, TRUE, 2).tolist() == [2, 1]


def test_metric_values_exact():
    assert recall_at_k(SCORES, TRUE) == 3 / 4
    assert exact_set_accuracy(SCORES, TRUE) == 0.5
    assert precision_at_budget(SCORES, TRUE, 4) == 4 / 8
    assert precision_at_budget(SCORES, TRUE, 3) == 4 / 6  # row 0: {0,2,1}∋0,2; row 1: {2,0,1}∋1,2
    assert precision_at_budget(SCORES, TRUE, 99) == 4 / 8  # capped at E


def test_counts_accumulate_and_merge():
    c = Counts()
    c.add(SCORES, TRUE)
    assert (c.rows, c.hits_k, c.hits_2k, c.exact) == (2, 3, 4, 1)
    m = c.merged(c).metrics(k=2, e=4)
    assert m == {"recall": 0.75, "precision_2k": 0.5, "exact": 0.5, "rows": 4}
    assert math.isnan(Counts().metrics(2, 4)["recall"])


def test_replay_on_planted_trace(tmp_path):
    fit, _ = perm_chain_trace(300, 3, 8, 2, seed=1)
    test, _ = perm_chain_trace(60, 3, 8, 2, seed=1)
    co = replay(test, build_predictor("coactivation", fit_trace=fit, depth=2), 2, progress=False)
    assert co.by_distance[1]["recall"] == 1.0 and co.by_distance[2]["exact"] == 1.0
    assert co.by_distance[1]["rows"] == 60 * 2 and co.by_distance[2]["rows"] == 60
    assert math.isnan(co.per_layer_recall[1][0]) and co.per_layer_recall[1][1:] == [1.0, 1.0]
    assert math.isnan(co.per_layer_recall[2][1]) and co.per_layer_recall[2][2] == 1.0
    assert co.cost_us_per_token > 0 and co.path is None
    fr = replay(test, build_predictor("frequency", fit_trace=fit, depth=2), 2, progress=False)
    assert fr.by_distance[1]["recall"] < 0.6
    out = tmp_path / "r.png"
    plot_recall_per_layer([co, fr], str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert co.to_dict()["per_layer_recall"]["1"][0] is None


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_ranked_rows_matches_ranked_experts_ties_included(rows):
    from router_predict.evaluate import ranked_experts, ranked_rows

    g = torch.Generator().manual_seed(rows)
    scores = torch.randint(0, 4, (rows, 16), generator=g).float()  # many ties
    assert ranked_rows(scores, 3) == ranked_experts(scores, 3).tolist()
