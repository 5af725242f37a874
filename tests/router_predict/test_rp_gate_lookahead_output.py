"""gate_lookahead_output: routers of layers l+1..l+d applied (through their input norms) to layer l's
output. Exact on a tiny model whenever nothing between layer l's output and the target router moves
the residual stream; fed by a forward hook online and by the trace's layer_output offline."""
import argparse

import numpy as np
import pytest
import torch

from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams
from moe_rt_app.cli import eval_predictor as cli_eval
from router_predict.base import LayerObservation
from moe_rt_app.cli.trace import record_trace
from router_predict.evaluate import replay
from router_predict.online import OnlinePredictor
from router_predict.predictors.gate_lookahead import GateLookaheadPredictor
from router_predict.predictors.gate_lookahead_output import GateLookaheadOutputPredictor
from router_predict.registry import build_predictor, build_predictor_for_model
from router_predict.trace import save_trace
from rp_helpers import make_trace, perm_chain_trace, zero_residual_checkpoint

PROMPTS = ["In the beginning God created", "And God said", "Hello world, the quick brown fox"]
PARAMS = SamplingParams(max_tokens=4, temperature=0)


def obs(layer, x):
    return LayerObservation(layer, torch.zeros(x.shape[0], 1, dtype=torch.long), torch.ones(x.shape[0], 1),
                            layer_output=x)


def test_predict_is_rmsnorm_then_router_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 experts reading H = 2
    p = GateLookaheadOutputPredictor([w, w, -w], top_k=1, norm_weights=[torch.ones(2), torch.tensor([2.0, 1.0]),
                                                                          torch.tensor([1.0, 3.0])], eps=0.0)
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt(12.5)
    s = p.predict(obs(0, x), depth=2)
    n1, n2 = x / 12.5 ** 0.5 * torch.tensor([2.0, 1.0]), x / 12.5 ** 0.5 * torch.tensor([1.0, 3.0])
    torch.testing.assert_close(s, torch.stack([n1 @ w.T, -(n2 @ w.T)]))
    assert p.predict(obs(2, x), depth=2).shape == (0, 1, 3)  # last layer: nothing ahead
    # With correction biases it ranks like DeepSeek-V3: sigmoid(logits) + bias.
    pb = GateLookaheadOutputPredictor([w, w], top_k=1, norm_weights=[torch.ones(2)] * 2, eps=0.0,
                                      biases=[torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])])
    torch.testing.assert_close(pb.predict(obs(0, x), 1),
                               torch.sigmoid(x / 12.5 ** 0.5 @ w.T)[None] + torch.tensor([0.0, 1.0, 0.0]))


def test_needs_norms_and_layer_output():
    with pytest.raises(MoeRtError, match="needs each router's input-norm weight"):
        GateLookaheadOutputPredictor([torch.ones(3, 2)] * 2, top_k=1)
    p = GateLookaheadOutputPredictor([torch.ones(3, 2)] * 2, top_k=1, norm_weights=[torch.ones(2)] * 2)
    with pytest.raises(MoeRtError, match="needs the output of each MoE layer's decoder layer"):
        p.predict(LayerObservation(0, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                                   hidden=torch.ones(1, 2)), 1)


def test_trace_without_layer_output_is_a_one_line_error(tmp_path):
    trace, _ = perm_chain_trace(16, 2, 3, 1)
    p = GateLookaheadOutputPredictor([torch.ones(3, 2)] * 2, top_k=1, norm_weights=[torch.ones(2)] * 2)
    with pytest.raises(MoeRtError, match="needs layer outputs but the trace has none"):
        replay(trace, p, 1, progress=False)
    from expert_cache.simulator import predict_schedule
    with pytest.raises(MoeRtError, match="no `layer_output` array"):
        predict_schedule(trace, p, 1, progress=False)


def test_cli_eval_without_layer_output_exits_2_with_one_line(tmp_path, mixtral_dir):
    trace, _ = perm_chain_trace(16, 2, 8, 2)
    save_trace(tmp_path / "t.npz", trace)
    parser = argparse.ArgumentParser()
    cli_eval.add_arguments(parser)
    args = parser.parse_args(["--trace", str(tmp_path / "t.npz"), "--fit-on", str(tmp_path / "t.npz"),
                              "--predictor", "gate_lookahead_output", "--model", str(mixtral_dir)])
    with pytest.raises(MoeRtError) as e:
        cli_eval.run(args)
    msg = str(e.value)
    assert "gate_lookahead_output needs layer outputs" in msg and "--with-layer-output" in msg
    assert "\n" not in msg


def test_registry_and_from_model_equal_from_checkpoint(mixtral_llm, mixtral_dir):
    with pytest.raises(MoeRtError, match="gate_lookahead_output needs the model's router weights"):
        build_predictor("gate_lookahead_output")
    a = build_predictor_for_model("gate_lookahead_output", mixtral_llm.model, predictor_dir=None, depth=1)
    b = build_predictor("gate_lookahead_output", model_dir=str(mixtral_dir))
    assert type(a) is type(b) is GateLookaheadOutputPredictor and a.layer_ids == b.layer_ids == [0, 1]
    assert a.eps == b.eps == mixtral_llm.model.spec.rms_norm_eps
    torch.testing.assert_close(a.norms, b.norms, rtol=0, atol=0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.predict(obs(0, x), 1), b.predict(obs(0, x), 1), rtol=0, atol=0)


def run_both(llm, depth):
    """Online recall of gate_lookahead_output (float32, from the hook) and the trace of the same run."""
    pred = GateLookaheadOutputPredictor.from_model(llm.model)
    online = OnlinePredictor(llm.model.hub, pred, depth, model=llm.model)
    with online:
        trace = record_trace(llm, PROMPTS, PARAMS, with_hidden=True, with_layer_output=True)
    return pred, online.stats(), trace


def test_exact_when_attention_adds_nothing(tmp_path):
    """Attention outputs zeroed, experts and routers random: layer l's output IS layer l+1's residual
    stream before its MoE, so d = 1 is exact; gate_lookahead (before layer l's experts) is not."""
    from moe_rt_app import LLM

    llm = LLM(zero_residual_checkpoint(tmp_path, zero=("o_proj.weight",), shared_router=False),
              dtype="float32", device="cpu", progress=False)
    pred, s, trace = run_both(llm, 2)
    assert s["by_distance"][1] == {"recall": 1.0, "rows": 2 * trace.num_rows}
    assert s["by_distance"][2]["recall"] < 1.0  # layer 1's experts move the stream before layer 2
    gate = GateLookaheadPredictor.from_model(llm.model)
    assert replay(trace, gate, 1, progress=False).by_distance[1]["recall"] < 1.0
    assert replay(trace, pred, 1, progress=False).by_distance[1]["recall"] >= 0.98  # float16 storage
    # The recorded output, normed by layer l+1, is layer l+1's recorded router input.
    for l in (0, 1):
        norm = llm.model.layers[l + 1].post_attention_layernorm
        got = norm(torch.from_numpy(trace.layer_output[:, l]).float())
        torch.testing.assert_close(got, torch.from_numpy(trace.hidden[:, l + 1]).float(), atol=2e-2, rtol=2e-2)


def test_exact_at_every_distance_when_residual_zero(tmp_path):
    from moe_rt_app import LLM

    llm = LLM(zero_residual_checkpoint(tmp_path), dtype="float32", device="cpu", progress=False)
    _, s, trace = run_both(llm, 2)
    assert s["by_distance"][1] == {"recall": 1.0, "rows": 2 * trace.num_rows}
    assert s["by_distance"][2] == {"recall": 1.0, "rows": trace.num_rows}


def test_recorder_hooks_only_while_recording(mixtral_llm):
    model = mixtral_llm.model
    trace = record_trace(mixtral_llm, PROMPTS[:1], PARAMS, with_layer_output=True)
    assert trace.layer_output.shape == (trace.num_rows, 2, 64) and trace.layer_output.dtype == np.float16
    assert trace.hidden is None and not any(layer._forward_hooks for layer in model.layers)
    assert record_trace(mixtral_llm, PROMPTS[:1], PARAMS).layer_output is None
    from router_predict.recorder import TraceRecorder
    with pytest.raises(MoeRtError, match="needs the model"):
        TraceRecorder(model.hub, 2, with_layer_output=True)


def test_llm_tracks_it_live(mixtral_dir):
    from moe_rt_app import LLM

    with LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, predictor="gate_lookahead_output") as llm:
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        stats = llm.engine.moe_stats()["predictor"]
        assert stats["predictor"] == "gate_lookahead_output" and stats["by_distance"][1]["rows"] > 0
    assert not llm.model.hub.active and not any(layer._forward_hooks for layer in llm.model.layers)


def test_replay_exact_on_synthetic_trace():
    """Same router everywhere, unit norms: a trace whose layer_output at l has l+1's routing as top-k."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(40, 16, generator=g).half()
    ids = (torch.nn.functional.rms_norm(x.float(), (16,), eps=1e-6) @ w.T).topk(2, dim=-1).indices
    trace = make_trace(ids[:, None, :].expand(40, 3, 2).numpy(), 8, steps=np.arange(40) // 8,
                       layer_output=x[:, None, :].expand(40, 3, 16).numpy())
    p = GateLookaheadOutputPredictor([w] * 3, top_k=2, norm_weights=[torch.ones(16)] * 3)
    r = replay(trace, p, 2, progress=False)
    assert [r.by_distance[d]["recall"] for d in (1, 2)] == [1.0, 1.0]
