"""Greedy fp32 output with any cache configuration equals the all-resident model, and the cache's
counters agree with what the model really used."""
import pytest
import torch

from checkpoints import write_checkpoint
from moe_rt_app import LLM, SamplingParams
from moe_rt.errors import MoeRtError

PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], [100, 3, 44, 55, 66, 77, 88]]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("mix4"), "mixtral", num_hidden_layers=4))


@pytest.fixture(scope="module")
def reference(model4):
    llm = LLM(model4, dtype="float32", device="cpu", progress=False)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def run(model, cache):
    llm = LLM(model, dtype="float32", device="cpu", progress=False, cache=cache)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)], llm.expert_cache.stats()
    finally:
        llm.expert_cache.close()


# prediction always on (a measured switch would spend these short runs measuring its baseline)
GATE = dict(policy="predictive", predictor="gate_lookahead", prefetch_switch="on")
CONFIGS = [
    dict(offload="disk", capacity_slots=1),  # every layer streams most experts
    dict(offload="cpu", capacity_slots=1, policy="lfu"),
    dict(offload="disk", capacity_slots=3, policy="lru"),
    dict(offload="cpu", capacity_slots=5, policy="lfu"),
    dict(offload="disk", capacity_slots=2, **GATE),
    dict(offload="cpu", capacity_slots=4, lookahead=2, prefetch_loads_budget=None, **GATE),  # no budget
    # a budget that binds: every forecast expert is asked for, LRU's loads are allowed (+ warm-up)
    dict(offload="disk", capacity_slots=2, lookahead=2, prefetch_rule="always", prefetch_loads_budget=1.0, **GATE),
    dict(offload="disk", capacity_slots=1, lookahead="auto", **GATE),
    dict(offload="cpu", capacity_slots=3, prefetch_queue=0, **GATE),  # predictive, no prefetch
    dict(offload="disk", capacity_slots=2, scope="global", policy="lru"),
    dict(offload="cpu", capacity_slots=12, scope="global", lookahead=3, **GATE),
    dict(offload="disk", capacity_slots=8, policy="lru"),  # everything fits
    dict(offload="cpu", capacity_slots=3, pinned={0: [1, 2], 3: [0]}, **GATE),
    dict(offload="disk", capacity_gb=0.0008, policy="lru"),  # 11 experts: 2 per layer
    dict(offload="disk", capacity_slots=2, lookahead=2, policy="predictive", predictor="gate_lookahead_output",
         prefetch_switch="on"),
    # one copy at a time: more prefetches wait in the host queue, where they may be cancelled
    dict(offload="disk", capacity_slots=6, scope="global", lookahead=3, copies_in_flight=1, **GATE),
    dict(offload="disk", capacity_slots=2, policy="predictive", predictor="gate_lookahead"),  # measured switch
]


@pytest.mark.parametrize("cache", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cached_greedy_output_equals_all_resident(model4, reference, cache):
    out, stats = run(model4, cache)
    assert out == reference
    assert stats["hits"] + stats["misses"] == stats["accesses"] > 0
    # every load (demand misses, streamed ones included, and prefetches) plus the pinned
    # experts' start-up loads moved one expert each
    pinned = sum(len(v) for v in cache.get("pinned", {}).values())
    assert stats["bytes_moved_total"] == (stats["loads"] + pinned) * stats["expert_bytes"]
    if cache.get("prefetch_loads_budget") == 1.0:
        assert stats["prefetch_budget_bound_visits"] > 0 and stats["shadow_lru_loads"] > 0


@pytest.mark.parametrize("predictor", ["gate_lookahead", "gate_lookahead_output"])
def test_predictive_cache_gets_prefetch_hits(model4, reference, predictor):
    out, stats = run(model4, dict(offload="cpu", capacity_slots=4, lookahead=2, policy="predictive",
                                  predictor=predictor, prefetch_switch="on"))
    assert out == reference
    assert stats["prefetches_issued"] > 0 and stats["prefetch_hits"] > 0
    assert stats["lookahead"] == 2 and stats["predictor"]["predictor"] == predictor


@pytest.mark.parametrize("predictor", ["gate_lookahead", "gate_lookahead_output"])
def test_greedy_output_is_unchanged_when_the_switch_turns_prediction_on_and_off(model4, reference, predictor,
                                                                              monkeypatch):
    """The switch flipped at every step boundary (its rule replaced; the measurements are its own
    tests'): the forecaster paused and resumed mid-generation, prefetches in flight at a switch-off."""
    import expert_cache.prefetch_switch as ps

    monkeypatch.setattr(ps, "next_switch", lambda state, window: ps.SwitchState(
        on=not state.on, changes=state.changes + 1))
    llm = LLM(model4, dtype="float32", device="cpu", progress=False,
              cache=dict(offload="disk", capacity_slots=2, lookahead=2, policy="predictive", predictor=predictor,
                         prefetch_rule="always"))  # prefetches not subject to measured times
    try:
        llm.expert_cache.switch.window_visits = 1
        out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        stats = llm.expert_cache.stats()
    finally:
        llm.expert_cache.close()
    assert out == reference
    assert stats["prefetch_switch_changes"] >= 8 and stats["prefetches_issued"] > 0
    assert 0.3 < stats["prefetch_on_fraction"] < 0.7


def test_accesses_equal_distinct_experts_the_model_used(model4):
    llm = LLM(model4, dtype="float32", device="cpu", progress=False,
              cache=dict(offload="disk", capacity_slots=3, policy="lru"))
    used = []
    llm.model.hub.subscribe(lambda ev: used.append(int(ev.topk_ids.unique().numel())))
    try:
        llm.generate(PROMPTS, PARAMS)
        s = llm.expert_cache.stats()
        assert s["accesses"] == sum(used)
        per_layer = s["per_layer"]
        assert sum(c["hits"] + c["misses"] for c in per_layer.values()) == sum(used)
        assert s["bytes_moved"] == {"disk": (s["misses"]) * s["expert_bytes"]}
        assert s["stall_s"] > 0
    finally:
        llm.expert_cache.close()


def test_disk_tier_reads_the_same_bytes_as_the_reader(model4):
    from moe_rt.checkpoint import CheckpointReader
    from moe_rt.loader import load_spec
    from expert_cache.slow_tier import DiskTier

    spec, reader = load_spec(model4), CheckpointReader(model4)
    tier = DiskTier(reader, spec)
    D, I = spec.hidden_size, spec.moe.intermediate_size
    for key in [(0, 0), (2, 5), (3, 7)]:
        w13, w2 = torch.empty(2 * I, D), torch.empty(D, I)
        tier.read_into(key, w13, w2)
        a, b = reader.read_expert(spec, *key)
        assert torch.equal(w13, a.float()) and torch.equal(w2, b.float())
    tier.close()


@pytest.mark.parametrize("cache, message", [
    (dict(offload="disk"), "exactly one of capacity_slots"),
    (dict(offload="cpu", capacity_slots=2, policy="predictive"), "needs a predictor"),
    (dict(offload="cpu", capacity_slots=2, policy="predictive", predictor="frequency"), "trace file"),
    (dict(offload="cpu", capacity_slots=2, pinned={9: [0]}), "pinned layer 9"),
    (dict(offload="cpu", capacity_slots=2, pinned={0: [11]}), "pinned expert 11"),
    (dict(offload="disk", capacity_gb=1e-9), "holds no expert"),
])
def test_bad_cache_config_is_a_one_line_error(model4, cache, message):
    with pytest.raises(MoeRtError, match=message) as e:
        LLM(model4, dtype="float32", device="cpu", progress=False, cache=cache)
    assert "\n" not in str(e.value)
