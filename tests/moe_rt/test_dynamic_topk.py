"""Dynamic top-k: which routed choices are dropped, how kept weights are renormalised, that every
expert-compute backend and the expert cache skip the dropped (-1) choices, and that with it off
routing is exactly the family's."""
import pytest
import torch

from moe_rt.layers.moe.reference import reference_experts
from moe_rt.layers.moe.routing import DynamicTopK, prune_choices, route
from moe_rt.models.spec import RoutingSpec
from moe_rt_app import LLM, SamplingParams

NORM = RoutingSpec(num_experts=8, top_k=3, norm_topk_prob=True)
RAW = RoutingSpec(num_experts=8, top_k=3, norm_topk_prob=False)


def test_threshold_drops_light_choices_and_renormalises_when_the_family_does():
    w, ids = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]), torch.tensor([[5, 2, 7], [1, 0, 3]])
    kw, kids = prune_choices(w, ids, NORM, threshold=0.2)
    assert kids.tolist() == [[5, 2, -1], [1, 0, 3]]
    torch.testing.assert_close(kw, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.4, 0.35, 0.25]]))
    # norm_topk_prob False (Qwen2-MoE): kept weights stay the raw router probabilities
    raw = torch.tensor([[0.4, 0.2, 0.1]])
    kw, kids = prune_choices(raw, torch.tensor([[0, 1, 2]]), RAW, threshold=0.2)
    assert kids.tolist() == [[0, 1, -1]]
    torch.testing.assert_close(kw, torch.tensor([[0.4, 0.2, 0.0]]))


def test_top_p_keeps_the_fewest_heaviest_choices_reaching_the_mass():
    w = torch.tensor([[0.1, 0.6, 0.3], [0.34, 0.33, 0.33]])  # routing order need not be weight order
    ids = torch.tensor([[4, 5, 6], [0, 1, 2]])
    assert prune_choices(w, ids, NORM, top_p=0.5)[1].tolist() == [[-1, 5, -1], [0, 1, -1]]
    assert prune_choices(w, ids, NORM, top_p=0.95)[1].tolist() == [[4, 5, 6], [0, 1, 2]]
    kw, kids = prune_choices(w, ids, NORM, top_p=0.85)
    assert kids.tolist() == [[-1, 5, 6], [0, 1, 2]]
    torch.testing.assert_close(kw[0], torch.tensor([0.0, 2 / 3, 1 / 3]))


def test_the_heaviest_choice_is_always_kept_and_scaling_is_kept():
    scaled = RoutingSpec(num_experts=8, top_k=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    w = torch.tensor([[1.5, 1.0]])  # normalised then scaled: sums to 2.5
    kw, kids = prune_choices(w, torch.tensor([[3, 4]]), scaled, threshold=0.99, top_p=0.01)
    assert kids.tolist() == [[3, -1]]
    torch.testing.assert_close(kw, torch.tensor([[2.5, 0.0]]))


def test_off_is_exact_and_counts_evaluations():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=g)
    w, ids = route(logits, NORM)
    assert DynamicTopK.from_config(0.0, 1.0) is None
    w2, ids2 = prune_choices(w, ids, NORM)  # threshold 0, top_p 1: nothing dropped
    assert torch.equal(ids2, ids) and torch.allclose(w2, w)
    dyn = DynamicTopK.from_config(0.25, 1.0)
    _, kept = dyn(w, ids, NORM)
    s = dyn.stats()
    assert s["layer_tokens"] == 50 and s["routed_choices"] == 150
    assert s["expert_evaluations"] == int((kept >= 0).sum()) < 150
    assert ((kept >= 0).sum(1) >= 1).all()


@pytest.mark.parametrize("backend", ["torch", "loop", "reference"])
def test_every_backend_skips_dropped_choices(backend):
    from moe_rt.layers.moe.compute import get_expert_compute

    g = torch.Generator().manual_seed(1)
    T, D, I, S = 19, 16, 24, 8
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(S, 2 * I, D, generator=g) / 4, torch.randn(S, D, I, generator=g) / 5
    w, ids = prune_choices(*route(torch.randn(T, S, generator=g), NORM), NORM, threshold=0.3)
    assert (ids == -1).any()
    kept_only = torch.zeros(T, D)
    for t in range(T):  # the sum over kept choices only, written out
        for k in range(3):
            if ids[t, k] >= 0:
                kept_only[t] += w[t, k] * reference_experts(x[t:t + 1], w13[ids[t, k]][None], w2[ids[t, k]][None],
                                                           torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))[0]
    torch.testing.assert_close(get_expert_compute(backend)(x, w13, w2, ids, w), kept_only, rtol=1e-5, atol=1e-5)


PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], [100, 3, 44, 55, 66, 77, 88]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _tokens(model, **opts):
    """Greedy tokens, moe_stats, and the distinct experts each MoE layer call used (ids >= 0)."""
    llm = LLM(model, dtype="float32", device="cpu", progress=False, **opts)
    used = []
    llm.model.hub.subscribe(lambda e: used.append(int(e.topk_ids[e.topk_ids >= 0].unique().numel())))
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)], llm.engine.moe_stats(), used
    finally:
        llm.close()


def test_engine_counts_evaluations_and_the_cache_ignores_dropped_choices(mixtral_dir):
    base, stats, _ = _tokens(mixtral_dir)
    assert "routing" not in stats  # off by default: routing untouched, nothing counted
    off, _, _ = _tokens(mixtral_dir, dynamic_topk_threshold=0.0, dynamic_topk_top_p=1.0)
    assert off == base
    dyn, stats, _ = _tokens(mixtral_dir, dynamic_topk_threshold=0.45)
    r = stats["routing"]
    assert 0 < r["expert_evaluations"] < r["routed_choices"] and r["experts_per_token"] < 2
    cached, stats, used = _tokens(mixtral_dir, dynamic_topk_threshold=0.45,
                                  cache=dict(offload="disk", capacity_slots=2, policy="lru"))
    assert cached == dyn
    # the cache accessed exactly the real experts of every layer call: -1 is no key
    assert stats["cache"]["accesses"] == sum(used) > 0
    looped, _, _ = _tokens(mixtral_dir, dynamic_topk_threshold=0.45, expert_compute="loop")
    assert looped == dyn


def test_tracing_refuses_dynamic_topk(mixtral_dir):
    from moe_rt.errors import MoeRtError
    from moe_rt_app.cli.trace import record_trace

    llm = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, dynamic_topk_top_p=0.8)
    with pytest.raises(MoeRtError, match="dynamic top-k off"):
        record_trace(llm, PROMPTS, PARAMS)
    llm.close()
