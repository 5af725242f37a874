"""OnlinePredictor: live forecasts and recall inside the engine, checked against offline replay."""
import numpy as np
import pytest
import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.events import BatchInfo, RouterEvent, RoutingHub
from moe_rt.sampling_params import SamplingParams
from router_predict.base import LayerObservation, Predictor
from moe_rt_app.cli.trace import record_trace
from router_predict.evaluate import replay
from router_predict.online import OnlinePredictor
from router_predict.predictors.coactivation import CoactivationPredictor
from router_predict.predictors.common import prev_tokens
from router_predict.predictors.gate_lookahead import GateLookaheadPredictor
from router_predict.predictors.gate_lookahead_output import GateLookaheadOutputPredictor
from router_predict.predictors.path import train_path
from router_predict.predictors.training import TrainConfig
from rp_helpers import zero_residual_checkpoint

PROMPTS = ["In the beginning God created", "And God said", "Hello world, the quick brown fox"]
PARAMS = SamplingParams(max_tokens=4, temperature=0)


class Fixed(Predictor):
    """Scores experts 0..E-1 descending for every token and layer; records what it was shown."""

    name = "fixed"

    def __init__(self, num_layers, num_experts, top_k):
        super().__init__(num_layers, num_experts, top_k)
        self.seen: list[LayerObservation] = []

    def predict(self, obs, depth):
        self.seen.append(obs)
        d = self.lookahead(obs.moe_index, depth)
        return torch.arange(self.num_experts, 0, -1).float().expand(d, obs.topk_ids.shape[0], -1)


def event(layer, ids, batch=None, h=3):
    ids = torch.tensor(ids)
    return RouterEvent(layer, layer, torch.zeros(len(ids), h), torch.zeros(len(ids), 4), ids,
                       torch.full(ids.shape, 0.5), batch)


def routed(hub, ev):
    """What an MoE block does after routing: tell the observers, then collect the forecasts."""
    hub.observe(ev)
    return [(f.target, f.distance, f.scores.tolist()) for f in hub.forecast(ev)]


def test_recall_and_forecasts_exact_by_hand():
    hub = RoutingHub()
    online = OnlinePredictor(hub, Fixed(3, 4, 2), depth=2)
    assert not hub.active  # nothing joined before start(): the MoE blocks skip the hooks
    online.start(forecaster=True)
    try:
        got = routed(hub, event(0, [[0, 1], [2, 3]]))
        assert got == [(1, 1, [2.0, 2.0, 0.0, 0.0]), (2, 2, [2.0, 2.0, 0.0, 0.0])]
        routed(hub, event(1, [[0, 2], [1, 0]]))  # forecast [0, 1] for both: 1 + 2 hits of 4
        assert routed(hub, event(2, [[3, 2], [0, 1]])) == []  # d=2: 0 + 2; d=1: 0 + 2; last layer
        routed(hub, event(0, [[0, 1]]))  # a new forward (indices restart): nothing left pending
        routed(hub, event(0, [[0, 1]]))  # again: the layer-0 forecasts above are dropped, never scored
    finally:
        online.stop()
    assert not hub.active
    s = online.stats()
    assert s["by_distance"][1] == {"recall": 5 / 8, "rows": 4}
    assert s["by_distance"][2] == {"recall": 2 / 4, "rows": 2}
    assert s["per_layer"][1] == {1: {"recall": 3 / 4, "rows": 2}, 2: {"recall": 2 / 4, "rows": 2}}
    assert s["recall"] == 7 / 12 and s["tokens"] == 4 and s["cost_us_per_token"] > 0
    assert online.latest(1).tolist() == [1.0, 1.0, 0.0, 0.0] and online.latest(0) is None
    assert routed(hub, event(1, [[0, 1]])) == []  # after stop: ignored
    assert online.stats()["tokens"] == 4


def test_observer_role_scores_but_hands_out_nothing():
    hub = RoutingHub()
    online = OnlinePredictor(hub, Fixed(3, 4, 2), depth=2)
    with online:  # start(): an observer
        assert routed(hub, event(0, [[0, 1]])) == []
        routed(hub, event(1, [[0, 1]]))
    assert online.stats()["by_distance"][1] == {"recall": 1.0, "rows": 1}
    assert online.latest(1).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="already has a forecaster"):  # one store, one forecaster
        with OnlinePredictor(hub, Fixed(3, 4, 2)).start(forecaster=True):
            OnlinePredictor(hub, Fixed(3, 4, 2)).start(forecaster=True)
    assert not hub.active


def test_prev_tokens_follow_sequences_across_steps():
    hub = RoutingHub()
    fixed = Fixed(2, 4, 2)
    online = OnlinePredictor(hub, fixed).start()
    steps = [  # (seq_ids, positions, token_ids): prefill of 7 and 8, decode, then a recompute of 7
        ([7, 7, 8], [0, 1, 0], [10, 11, 20]),
        ([7, 8], [2, 1], [12, 21]),
        ([7, 7, 7, 7], [0, 1, 2, 3], [10, 11, 12, 13]),
    ]
    for n, (s, p, t) in enumerate(steps):
        hub.observe(event(0, [[0, 1]] * len(s), BatchInfo(n, torch.tensor(s), torch.tensor(p), torch.tensor(t))))
    online.stop()
    got = [o.prev_token_ids.tolist() for o in fixed.seen]
    assert got == [[-1, 10, -1], [11, 20], [-1, 10, 11, 12]]
    seq, pos, tok = (np.concatenate([np.array(x[i]) for x in steps]) for i in range(3))
    assert sum(got, []) == prev_tokens(seq, pos, tok).tolist()  # the offline rule gives the same


def test_rejects_bad_setup():
    with pytest.raises(MoeRtError, match="depth must be >= 1"):
        OnlinePredictor(RoutingHub(), Fixed(2, 4, 2), depth=0)
    online = OnlinePredictor(RoutingHub(), Fixed(2, 4, 2)).start()
    with pytest.raises(MoeRtError, match="MoE layer 5"):
        online.hub.observe(event(5, [[0, 1]]))


def test_from_model_equals_from_checkpoint(mixtral_llm, mixtral_dir):
    a = GateLookaheadPredictor.from_model(mixtral_llm.model)
    b = GateLookaheadPredictor.from_checkpoint(str(mixtral_dir))
    assert a.layer_ids == b.layer_ids == [0, 1] and a.top_k == b.top_k == 2 and a.biases is None
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    torch.testing.assert_close(a.norms, b.norms, rtol=0, atol=0)
    assert a.norms.shape == (2, 64)
    obs = LayerObservation(0, torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2),
                           hidden=torch.randn(5, 64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(a.predict(obs, 1), b.predict(obs, 1), rtol=0, atol=0)


class RecordingStore:
    """The model's store, recording the forecasts the MoE blocks hand it before each prepare."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def prefetch(self, forecasts):
        self.calls.extend((f.target, f.distance, float(f.scores.sum())) for f in forecasts)

    def prepare(self, moe_index, topk_ids):
        return self.inner.prepare(moe_index, topk_ids)


def run_online_and_record(llm, predictor, depth):
    """Run the predictor as the model's forecaster while recording a trace; the forecasts are
    what reached the store."""
    online = OnlinePredictor(llm.model.hub, predictor, depth, model=llm.model)
    ctx = llm.model.moe_ctx
    store = ctx.store = RecordingStore(ctx.store)
    try:
        with online.start(forecaster=True):
            trace = record_trace(llm, PROMPTS, PARAMS, with_hidden=True, with_layer_output=True)
    finally:
        ctx.store = store.inner
    return online, trace, store.calls


def test_online_recall_equals_offline_replay(mixtral_llm):
    gate = GateLookaheadPredictor.from_model(mixtral_llm.model)
    online, trace, calls = run_online_and_record(mixtral_llm, gate, 1)
    offline = replay(trace, gate, 1, progress=False)
    s = online.stats()
    assert s["tokens"] == trace.num_rows == s["by_distance"][1]["rows"]
    assert s["by_distance"][1]["recall"] == offline.by_distance[1]["recall"]
    assert s["per_layer"][1][1]["recall"] == offline.per_layer_recall[1][1]
    assert 0 < s["recall"] < 1  # a random model's residual stream moves: look-ahead is not exact
    # One forecast for layer 1 per forward batch, each counting k experts per token.
    assert {c[:2] for c in calls} == {(1, 1)} and sum(c[2] for c in calls) == 2 * trace.num_rows
    assert mixtral_llm.model.hub.active is False
    # An id-only predictor fitted on this run, judged live on a second run, equals its replay too.
    coact = CoactivationPredictor.fit(trace, 1)
    online, trace2, _ = run_online_and_record(mixtral_llm, coact, 1)
    assert online.stats()["recall"] == replay(trace2, coact, 1, progress=False).by_distance[1]["recall"]
    # The path predictor reads token ids, positions and previous tokens from the engine's BatchInfo.
    path = train_path(trace, cfg=TrainConfig(epochs=2, progress=False)).predictor
    online, trace3, _ = run_online_and_record(mixtral_llm, path, 1)
    assert online.stats()["recall"] == replay(trace3, path, 1, progress=False).by_distance[1]["recall"]


def test_output_lookahead_online_recall_equals_offline_replay(mixtral_llm):
    """gate_lookahead_output forecasts from the decoder layer's forward hook, not the router event;
    live recall still equals replay of the trace recorded in the same run (float16 layer_output)."""
    model = mixtral_llm.model
    pred = GateLookaheadOutputPredictor.from_model(model)
    online, trace, calls = run_online_and_record(mixtral_llm, pred, 1)
    offline = replay(trace, pred, 1, progress=False)
    s = online.stats()
    assert s["tokens"] == trace.num_rows == s["by_distance"][1]["rows"]
    assert s["by_distance"][1]["recall"] == offline.by_distance[1]["recall"]
    assert 0 < s["recall"] < 1 and s["cost_us_per_token"] > 0
    assert {c[:2] for c in calls} == {(1, 1)} and sum(c[2] for c in calls) == 2 * trace.num_rows
    # Hooks and subscription exist only while running.
    assert not model.hub.active and not any(layer._forward_hooks for layer in model.layers)


def test_output_lookahead_needs_the_model():
    pred = GateLookaheadOutputPredictor([torch.randn(4, 3)] * 2, 2, norm_weights=[torch.ones(3)] * 2)
    with pytest.raises(MoeRtError, match="reads each MoE layer's output: give OnlinePredictor the model"):
        OnlinePredictor(RoutingHub(), pred)


def test_gate_lookahead_exact_when_routers_identical_and_residual_zero(tmp_path):
    from moe_rt_app import LLM

    llm = LLM(zero_residual_checkpoint(tmp_path), dtype="float32", device="cpu", progress=False)
    gate = GateLookaheadPredictor.from_model(llm.model)
    online, trace, calls = run_online_and_record(llm, gate, 2)
    s = online.stats()
    assert s["by_distance"][1] == {"recall": 1.0, "rows": 2 * trace.num_rows}
    assert s["by_distance"][2] == {"recall": 1.0, "rows": trace.num_rows}
    assert (trace.topk_ids[:, 1] != trace.topk_ids[:, 0]).any()  # the norms make the layers differ
    # Without the norm rescaling the same routers are no longer exact.
    plain = GateLookaheadPredictor(list(gate.weights), 2)
    assert replay(trace, plain, 1, progress=False).by_distance[1]["recall"] < 1.0
    assert {(c[0], c[1]) for c in calls} == {(1, 1), (2, 2), (2, 1)}
    assert online.latest(2).sum() == 2 * int((trace.steps == trace.steps.max()).sum())


def test_forecasts_carry_the_grades_replay_gives_them():
    from expert_cache.forecast import aggregate_scores, predictions
    from router_predict.graded import GradedForecast

    hub = RoutingHub()
    pred = Fixed(3, 4, 2)
    online = OnlinePredictor(hub, pred, depth=2)
    online.start(forecaster=True)
    try:
        ev = event(0, [[0, 1], [2, 3]])
        hub.observe(ev)
        forecasts = hub.forecast(ev)
    finally:
        online.stop()
    assert all(isinstance(f, GradedForecast) for f in forecasts)
    # shares x E of scores 4 3 2 1: 2.58 (grade 2), .95 (1); runner-ups .35, .13 (8); two tokens
    assert forecasts[0].grades == {0: (0, 0, 2) + (0,) * 13, 1: (0, 2) + (0,) * 14,
                                   2: (0,) * 8 + (2,) + (0,) * 7, 3: (0,) * 8 + (2,) + (0,) * 7}
    got = {}
    for f in forecasts:
        got.update(predictions(f))
    scores = pred.predict(LayerObservation(0, torch.tensor([[0, 1], [2, 3]]), None, None, None, None), 2)
    assert got == aggregate_scores(scores, 2, 1)
