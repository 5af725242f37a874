import numpy as np
import pytest
import torch

from moe_rt.errors import MoeRtError
from router_predict.evaluate import replay
from router_predict.predictors.learned import LearnedPregate, train_pregate
from router_predict.predictors.training import TrainConfig, masked_bce, masked_recall
from router_predict.registry import build_predictor
from rp_helpers import make_trace


def linear_planted_trace(n, num_layers=3, e=8, h=12, k=2, seed=0):
    """Experts at layer l+1 = top-k of (hidden at layer l) @ A[l]: learnable by a linear pre-gate."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_layers, h, e, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, num_layers, h, generator=g).half()
    ids = torch.zeros(n, num_layers, k, dtype=torch.long)
    ids[:, 0] = torch.rand(n, e, generator=g).topk(k, dim=-1).indices
    for l in range(1, num_layers):
        ids[:, l] = (x[:, l - 1].float() @ a[l - 1]).topk(k, dim=-1).indices
    return make_trace(ids.numpy(), e, hidden=x.numpy(), seq_ids=np.arange(n) % 10,
                      steps=np.arange(n) // 10, positions=np.arange(n) // 10)


def test_masked_loss_and_recall_exact():
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # [B=1, P=2, E=2]
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(masked_bce(logits, targets, mask), torch.tensor(np.log(2.0), dtype=torch.float32))
    assert masked_recall(logits, targets, mask, 1) == (1, 1)  # tie at slot 0 -> index 0 first


def test_pregate_learns_planted_linear_routing(tmp_path):
    trace = linear_planted_trace(600)
    result = train_pregate(trace, depth=1, cfg=TrainConfig(epochs=25, batch_size=64, lr=1e-2, progress=False))
    log = result.log
    assert log.held_out_loss[-1] < 0.7 * log.held_out_loss_before
    assert log.held_out_recall > 0.8  # chance is k/E = 0.25
    test = linear_planted_trace(100, seed=5)
    report = replay(test, result.predictor, 1, progress=False)
    assert report.by_distance[1]["recall"] > 0.8
    result.predictor.save(str(tmp_path / "p"))
    loaded = build_predictor("learned", predictor_dir=str(tmp_path / "p"), depth=1)
    again = replay(test, loaded, 1, progress=False)
    assert again.by_distance[1] == report.by_distance[1]
    with pytest.raises(MoeRtError, match="trained for depth 1"):
        build_predictor("learned", predictor_dir=str(tmp_path / "p"), depth=2)


def test_mlp_variant_and_depth_two_shapes():
    trace = linear_planted_trace(60)
    r = train_pregate(trace, depth=2, mlp_hidden=8, cfg=TrainConfig(epochs=1, progress=False))
    from router_predict.base import LayerObservation
    obs = LayerObservation(0, torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2), hidden=torch.randn(5, 12))
    assert r.predictor.predict(obs, 2).shape == (2, 5, 8)
    last_but_one = LayerObservation(1, obs.topk_ids, obs.topk_weights, hidden=obs.hidden)
    assert r.predictor.predict(last_but_one, 2).shape == (1, 5, 8)


def test_load_errors(tmp_path):
    with pytest.raises(MoeRtError, match="not a trained predictor folder"):
        LearnedPregate.load(str(tmp_path))
