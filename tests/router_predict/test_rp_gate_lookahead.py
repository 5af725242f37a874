import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moe_rt.errors import MoeRtError
from router_predict.evaluate import replay
from router_predict.predictors.gate_lookahead import GateLookaheadPredictor, moe_layer_ids
from router_predict.registry import build_predictor
from rp_helpers import make_trace


def shared_router_trace(n=48, num_layers=4, e=8, h=16, k=2, seed=0):
    """Every layer has router W and the residual update is zero, so hidden is the same at all layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, h, generator=g)
    x = torch.randn(n, h, generator=g).half()
    ids = (x.float() @ w.T).topk(k, dim=-1).indices  # [N, k]
    hidden = x[:, None, :].expand(n, num_layers, h).numpy()
    trace = make_trace(ids[:, None, :].expand(n, num_layers, k).numpy(), e, hidden=hidden,
                       steps=np.arange(n) // 8, seq_ids=np.arange(n) % 8)
    return trace, w


def test_exact_when_routers_shared_and_residual_zero():
    trace, w = shared_router_trace()
    p = GateLookaheadPredictor([w] * 4, top_k=2)
    r = replay(trace, p, depth=3, progress=False)
    assert [r.by_distance[d]["recall"] for d in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert r.by_distance[1]["exact"] == 1.0


def test_wrong_router_is_not_exact():
    trace, w = shared_router_trace()
    r = replay(trace, GateLookaheadPredictor([-w] * 4, top_k=2), depth=1, progress=False)
    assert r.by_distance[1]["recall"] == 0.0  # negated logits rank the true top-2 last


def test_correction_bias_shifts_scores():
    w = torch.zeros(3, 2)
    p = GateLookaheadPredictor([w, w], top_k=1, biases=[torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])])
    from router_predict.base import LayerObservation
    s = p.predict(LayerObservation(0, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                                   hidden=torch.ones(1, 2)), depth=2)
    torch.testing.assert_close(s, torch.tensor([[[0.5, 1.5, 0.5]]]))


def write_model(tmp_path, config, tensors, shards=1):
    (tmp_path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_from_checkpoint_sharded_deepseek_style(tmp_path):
    cfg = {"num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
           "n_routed_experts": 4, "num_experts_per_tok": 2}
    t = {f"model.layers.{i}.mlp.gate.weight": torch.full((4, 5), float(i)) for i in (1, 2)}
    t.update({f"model.layers.{i}.mlp.gate.e_score_correction_bias": torch.arange(4.0) for i in (1, 2)})
    t["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(2, 2)  # dense layer, not a router
    write_model(tmp_path, cfg, t, shards=2)
    p = build_predictor("gate_lookahead", model_dir=str(tmp_path))
    assert (p.num_layers, p.num_experts, p.top_k, p.layer_ids) == (2, 4, 2, [1, 2])
    assert p.weights[1, 0, 0].item() == 2.0 and p.biases is not None


def test_from_checkpoint_mixtral_single_file(tmp_path):
    cfg = {"num_hidden_layers": 2, "num_local_experts": 3, "num_experts_per_tok": 1}
    write_model(tmp_path, cfg, {f"model.layers.{i}.block_sparse_moe.gate.weight": torch.ones(3, 4)
                                for i in range(2)})
    p = GateLookaheadPredictor.from_checkpoint(str(tmp_path))
    assert p.weights.shape == (2, 3, 4) and p.biases is None


def test_from_checkpoint_errors(tmp_path):
    with pytest.raises(MoeRtError, match="no config.json"):
        GateLookaheadPredictor.from_checkpoint(str(tmp_path))
    cfg = {"num_hidden_layers": 2, "num_experts": 3, "num_experts_per_tok": 1}
    write_model(tmp_path, cfg, {"model.layers.0.mlp.gate.weight": torch.ones(3, 4)})
    with pytest.raises(MoeRtError, match="no router weight for MoE layer 1"):
        GateLookaheadPredictor.from_checkpoint(str(tmp_path))


def test_moe_layer_ids_from_config():
    assert moe_layer_ids({"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}) == [1]
    assert moe_layer_ids({"num_hidden_layers": 3}) == [0, 1, 2]


def test_hidden_predictor_on_trace_without_hidden_is_a_user_error():
    trace, w = shared_router_trace()
    trace.hidden = None
    with pytest.raises(MoeRtError, match="needs hidden states but the trace has none"):
        replay(trace, GateLookaheadPredictor([w] * 4, top_k=2), depth=1, progress=False)
    trace, _ = shared_router_trace(e=8)
    with pytest.raises(MoeRtError, match="is for 2 MoE layers x 8 experts but the trace has 4 x 8"):
        replay(trace, GateLookaheadPredictor([w] * 2, top_k=2), depth=1, progress=False)


@pytest.mark.parametrize("tokens", [0, 1, 5])  # 0: an expert-parallel rank routed nothing this step
def test_fused_lookahead_matches_the_routers_applied_one_by_one(tokens):
    """predict's one fused matmul per layer against each later router applied to the rescaled
    router input (the definition), with norms and a correction bias."""
    from router_predict.base import LayerObservation

    g = torch.Generator().manual_seed(3)
    L, E, H = 5, 8, 16
    ws = [torch.randn(E, H, generator=g) for _ in range(L)]
    norms = [torch.rand(H, generator=g) + 0.5 for _ in range(L)]
    biases = [torch.randn(E, generator=g) for _ in range(L)]
    p = GateLookaheadPredictor(ws, top_k=2, biases=biases, norm_weights=norms)
    h = torch.randn(tokens, H, generator=g)
    for l in range(L - 1):
        obs = LayerObservation(l, torch.zeros(tokens, 2, dtype=torch.long), torch.ones(tokens, 2), h,
                               None, None, None)
        got = p.predict(obs, 3)
        for d in range(got.shape[0]):
            t = l + 1 + d
            want = torch.sigmoid((h / norms[l] * norms[t]) @ ws[t].T) + biases[t]
            torch.testing.assert_close(got[d], want, rtol=1e-5, atol=1e-5)
    assert got.shape == (1, tokens, E)  # the last layer but one sees one layer ahead
