"""The one assembly point: a config becomes a running engine with its expert cache, routing
predictor and expert parallelism. `LLM`, every CLI command, the server and each expert-parallel
rank build through `build_engine`; nothing else wires packages together.

    build_engine(cfg)
      1. read the placement file (cache and expert_parallel sections), once
      2. LLMEngine: model (routed experts left on disk when a cache will fetch them), KV cache
      3. placement checked against the model (every expert placed, pinned ids in range)
      4. the expert cache, made the model's expert store, with its prefetch predictor as the
         model's forecaster (its forecasts reach the cache through each MoE block)
      5. an online predictor tracked for its live recall (cfg.predictor): an observer only
Each installed part is attached to the engine: its stats join moe_stats() and it stops when the
engine closes. Expert parallelism is applied to the built engine by moe_rt_app/ep_llm.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from expert_cache.install import install_expert_cache
from moe_rt.engine.llm_engine import LLMEngine
from moe_rt_app.config import RuntimeConfig
from moe_rt_app.placement_file import PlacementFile, load_placement


@dataclass
class Assembly:
    """A built engine and the parts installed on it (None where not configured)."""

    engine: LLMEngine
    placement: PlacementFile = field(default_factory=PlacementFile)
    expert_cache: object | None = None  # expert_cache.runtime.ExpertCache
    online_predictor: object | None = None  # router_predict.online.OnlinePredictor


def build_engine(cfg: RuntimeConfig, *, progress: bool = True) -> Assembly:
    placement = load_placement(cfg.placement) if cfg.placement else PlacementFile()
    cache_cfg = cfg.cache or placement.cache
    offload = cache_cfg is not None and cache_cfg.offload != "none"
    engine = LLMEngine(cfg.model_section(), cfg.engine, load_experts=not offload, progress=progress)
    try:
        spec = engine.spec
        placement.check_model(len(spec.moe_layer_ids), spec.num_experts)
        built = Assembly(engine, placement)
        if offload:
            cache_cfg.check_model(len(spec.moe_layer_ids), spec.num_experts)
            built.expert_cache = install_expert_cache(
                engine.model, engine.reader, cache_cfg, device=engine.device, dtype=engine.dtype
            )
            engine.attach("cache", built.expert_cache.stats, built.expert_cache.close)
        if cfg.predictor:
            built.online_predictor = _track_predictor(engine, cfg)
        return built
    except BaseException:
        engine.close()
        raise


def _track_predictor(engine: LLMEngine, cfg: RuntimeConfig):
    from router_predict.online import OnlinePredictor
    from router_predict.registry import build_predictor_for_model

    predictor = build_predictor_for_model(cfg.predictor, engine.model, predictor_dir=cfg.predictor_dir,
                                          depth=cfg.predictor_depth)
    online = OnlinePredictor(engine.model.hub, predictor, cfg.predictor_depth, model=engine.model)
    online.start(forecaster=False)  # scored, never prefetched from: the cache has its own forecaster
    engine.attach("predictor", online.stats, online.stop)
    return online
