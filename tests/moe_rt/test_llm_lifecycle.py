"""LLM with an expert cache: stats through engine.moe_stats(), and close() stops background work."""
import threading

from moe_rt_app import LLM, SamplingParams


def test_close_stops_the_cache_and_unregisters_its_stats(mixtral_dir, mixtral_llm):
    before = {t.ident for t in threading.enumerate()}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(mixtral_dir, dtype="float32", device="cpu", progress=False,
             cache={"offload": "disk", "capacity_slots": 2, "policy": "lru"}) as llm:
        out = llm.generate("In the beginning", params)[0]
        stats = llm.engine.moe_stats()["cache"]
        assert stats["hits"] + stats["misses"] > 0
        assert out.token_ids == mixtral_llm.generate("In the beginning", params)[0].token_ids
    assert llm.engine.moe_stats() == {} and llm.expert_cache is None
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    for t in leftover:
        t.join(timeout=10)
    assert not [t for t in leftover if t.is_alive()]


def test_online_predictor_reports_live_recall(mixtral_dir):
    with LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, predictor="gate_lookahead") as llm:
        llm.generate(["In the beginning", "Hello world"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        stats = llm.engine.moe_stats()["predictor"]
        assert stats["predictor"] == "gate_lookahead" and stats["tokens"] > 0
        assert 0.0 <= stats["recall"] <= 1.0 and stats["by_distance"][1]["rows"] > 0
        assert llm.model.hub.active
    assert not llm.model.hub.active and "predictor" not in llm.engine.moe_stats()


def test_id_only_predictor_needs_a_fit_trace(mixtral_dir):
    import pytest

    from moe_rt import MoeRtError

    with pytest.raises(MoeRtError, match="fitted on a trace"):
        LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, predictor="coactivation")


def test_one_predictor_serves_the_cache_and_reports_its_recall(mixtral_dir, mixtral_llm):
    """With a predictive cache the predictor section runs once, as the model's forecaster: it feeds
    the prefetches, its live recall is the engine's "predictor" figure, and it leaves the model
    when the engine closes."""
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    # prediction always on: the measured switch would spend 5 tokens on its baseline window
    cache = {"offload": "cpu", "capacity_slots": 4, "policy": "predictive", "prefetch_switch": "on"}
    with LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, predictor="gate_lookahead",
             cache=cache) as llm:
        out = llm.generate("In the beginning", params)[0]
        stats = llm.engine.moe_stats()
        assert stats["cache"]["prefetches_issued"] > 0
        assert stats["predictor"] == stats["cache"]["predictor"] and stats["predictor"]["tokens"] > 0
        assert llm.online_predictor is llm.expert_cache.forecaster
        assert out.token_ids == mixtral_llm.generate("In the beginning", params)[0].token_ids
    assert not llm.model.hub.active
