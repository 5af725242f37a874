import numpy as np
import pytest
import torch

from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation
from router_predict.predictors.coactivation import CoactivationPredictor
from router_predict.predictors.frequency import FrequencyPredictor
from router_predict.registry import build_predictor
from rp_helpers import make_trace, perm_chain_trace


def obs_at(trace, layer, rows=slice(None)):
    ids = torch.from_numpy(trace.topk_ids[rows, layer]).long()
    return LayerObservation(layer, ids, torch.from_numpy(trace.topk_weights[rows, layer]))


def test_frequency_fit_exact():
    # 4 tokens, 1 layer, k=1, E=3: expert 0 three times, expert 2 once.
    t = make_trace(np.array([0, 0, 0, 2]).reshape(4, 1, 1), 3)
    p = FrequencyPredictor.fit(t, alpha=0.0)
    torch.testing.assert_close(p.probs, torch.tensor([[0.75, 0.0, 0.25]]))
    p = FrequencyPredictor.fit(t, alpha=1.0)  # (counts + 1/3) / 5
    torch.testing.assert_close(p.probs, torch.tensor([[10 / 15, 1 / 15, 4 / 15]]))


def test_frequency_shapes_and_last_layer():
    t, _ = perm_chain_trace(40, 3, 8, 2)
    p = FrequencyPredictor.fit(t)
    assert p.predict(obs_at(t, 0, slice(0, 5)), 5).shape == (2, 5, 8)
    assert p.predict(obs_at(t, 2, slice(0, 5)), 5).shape == (0, 5, 8)
    assert p.predict_path(torch.zeros(5, dtype=torch.long), torch.zeros(5)).shape == (3, 5, 8)


def test_coactivation_exact_small():
    # k=1, E=2, two layers: expert 0 -> 1 twice, expert 1 -> 1 once. beta=0: pure counts.
    ids = np.array([[0, 1], [0, 1], [1, 1]]).reshape(3, 2, 1)
    p = CoactivationPredictor.fit(make_trace(ids, 2), depth=1, beta=0.0)
    torch.testing.assert_close(p.cond[0, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    scores = p.predict(LayerObservation(0, torch.tensor([[0], [1]]), torch.ones(2, 1)), 1)
    torch.testing.assert_close(scores, torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]))


def test_coactivation_ignores_dropped_choices():
    # Dynamic top-k marks dropped choices -1: they add no row (not the last expert's).
    t, _ = perm_chain_trace(40, 3, 8, 2)
    p = CoactivationPredictor.fit(t, depth=1)
    ids = torch.tensor([[1, -1], [-1, 5]])
    scores = p.predict(LayerObservation(0, ids, torch.ones(2, 2)), 1)
    torch.testing.assert_close(scores[0, 0], p.cond[0, 0, 1])
    torch.testing.assert_close(scores[0, 1], p.cond[0, 0, 5])


def test_coactivation_backs_off_to_frequency_for_unseen_expert():
    ids = np.array([[0, 1], [0, 1]]).reshape(2, 2, 1)  # expert 1 never used at layer 0
    p = CoactivationPredictor.fit(make_trace(ids, 2), depth=1, beta=1.0)
    marginal = FrequencyPredictor.fit(make_trace(ids, 2)).probs[1]
    torch.testing.assert_close(p.cond[0, 0, 1], marginal)


def recall(scores, true_ids, k):
    top = scores.topk(k, dim=-1).indices
    return (top[..., :, None] == true_ids[..., None, :]).any(-1).float().mean().item()


def test_planted_permutation_coactivation_recovers_it_frequency_does_not():
    fit, _ = perm_chain_trace(400, 3, 16, 2, seed=0)
    test, _ = perm_chain_trace(200, 3, 16, 2, seed=0)  # same permutation (same seed), fresh rows
    test.topk_ids = test.topk_ids[::-1].copy()
    co = build_predictor("coactivation", fit_trace=fit, depth=2)
    fr = build_predictor("frequency", fit_trace=fit, depth=2)
    o = obs_at(test, 0)
    truth = torch.from_numpy(test.topk_ids[:, 1:3]).long().permute(1, 0, 2)  # [d, T, k]
    assert recall(co.predict(o, 2), truth, 2) == 1.0
    assert recall(fr.predict(o, 2), truth, 2) < 0.3  # about k/E = 0.125


def test_registry_errors():
    with pytest.raises(MoeRtError, match="needs a trace to fit on"):
        build_predictor("frequency", fit_trace=None)
    with pytest.raises(MoeRtError, match="unknown predictor 'nope'"):
        build_predictor("nope")
    with pytest.raises(MoeRtError, match="--model"):
        build_predictor("gate_lookahead")
    t, _ = perm_chain_trace(10, 2, 4, 1)
    with pytest.raises(MoeRtError, match="hidden states to train on"):
        build_predictor("learned", fit_trace=t)
    with pytest.raises(MoeRtError, match="token_ids to train on"):
        build_predictor("path", fit_trace=t)
    with pytest.raises(MoeRtError, match="depth must be >= 1"):
        build_predictor("frequency", fit_trace=t, depth=0)
