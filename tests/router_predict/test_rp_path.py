import numpy as np
import torch

from router_predict.base import LayerObservation
from router_predict.evaluate import replay
from router_predict.predictors.common import prev_tokens
from router_predict.predictors.path import PathPredictor, train_path
from router_predict.predictors.training import TrainConfig
from rp_helpers import make_trace


def token_planted_trace(n, vocab=12, num_layers=3, e=8, k=2, seed=0):
    """Every layer's experts are a fixed function of the token id."""
    table = torch.rand(vocab, num_layers, e, generator=torch.Generator().manual_seed(7)).topk(k, -1).indices
    tokens = np.random.default_rng(seed).integers(0, vocab, n)
    return make_trace(table[tokens].numpy(), e, token_ids=tokens, seq_ids=np.arange(n) % 8,
                      steps=np.arange(n) // 8, positions=np.arange(n) // 8)


def test_prev_tokens_exact():
    got = prev_tokens(np.array([1, 2, 1, 2, 1]), np.array([0, 0, 1, 1, 0]), np.array([10, 20, 11, 21, 12]))
    assert got.tolist() == [-1, -1, 10, 20, -1]


def test_path_predictor_learns_token_routing(tmp_path):
    result = train_path(token_planted_trace(400), width=16,
                        cfg=TrainConfig(epochs=12, batch_size=64, lr=5e-2, progress=False))
    assert result.log.held_out_loss[-1] < 0.6 * result.log.held_out_loss_before
    test = token_planted_trace(80, seed=3)
    r = replay(test, result.predictor, 2, progress=False)
    assert r.path["recall"] > 0.95 and r.by_distance[1]["recall"] > 0.95
    result.predictor.save(str(tmp_path / "p"))
    loaded = PathPredictor.load(str(tmp_path / "p"))
    tok, pos = torch.tensor([1, 5, 99]), torch.tensor([0, 3, 7])  # 99: unseen token -> unknown row
    path = loaded.predict_path(tok, pos)
    torch.testing.assert_close(path, result.predictor.predict_path(tok, pos))
    obs = LayerObservation(0, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), token_ids=tok, positions=pos)
    torch.testing.assert_close(loaded.predict(obs, 5), path[1:3])
