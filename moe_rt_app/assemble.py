"""The one assembly point: a config becomes a running engine with its expert cache, routing
predictor and expert parallelism. `LLM`, every CLI command, the server and each expert-parallel
rank build through `build_engine`; nothing else wires packages together.

    build_engine(cfg)      cfg: the validated tree (moe_rt_app/config.py), file and flags merged
      1. LLMEngine: model (routed experts left on disk when a cache will fetch them), KV cache
      2. the tree checked against the model (pinned and placed expert ids in range)
      3. the expert cache, made the model's expert store; with policy predictive the predictor
         section runs as the model's forecaster (its forecasts reach the cache through each MoE block)
      4. otherwise the predictor section runs online as an observer, tracked for its live recall
Each installed part is attached to the engine: its stats join moe_stats() and it stops when the
engine closes. Expert parallelism is applied to the built engine by moe_rt_app/ep_llm.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from expert_cache.install import install_expert_cache
from moe_rt.engine.llm_engine import LLMEngine
from moe_rt_app.config import RuntimeConfig
from router_predict.config import RESIDUAL_GATE


@dataclass
class Assembly:
    """A built engine and the parts installed on it (None where not configured)."""

    engine: LLMEngine
    expert_cache: object | None = None  # expert_cache.cache.ExpertCache
    online_predictor: object | None = None  # router_predict.online.OnlinePredictor


def build_engine(cfg: RuntimeConfig, *, progress: bool = True) -> Assembly:
    engine = LLMEngine(cfg.model_section(), cfg.engine, load_experts=not cfg.offload,
                       reserve_bytes=_cache_bytes(cfg), progress=progress)
    try:
        spec = engine.spec
        cfg.check_model(len(spec.moe_layer_ids), spec.num_experts)
        built = Assembly(engine)
        prefetching = cfg.offload and cfg.cache.policy == "predictive"
        if cfg.offload:
            predictor = None
            if prefetching:
                predictor = _predictor(engine, cfg, cfg.cache.forecast_depth)
            built.expert_cache = install_expert_cache(
                engine.model, engine.reader, cfg.cache, device=engine.device, dtype=engine.dtype,
                predictor=predictor, expert_bits=cfg.engine.expert_bits,
                expert_group_size=cfg.engine.expert_group_size,
                expert_bits_plan=cfg.engine.expert_bits_plan,
            )
            engine.attach("cache", built.expert_cache.stats, built.expert_cache.close)
            if built.expert_cache.forecaster is not None:  # the one predictor: its recall is reported too
                built.online_predictor = built.expert_cache.forecaster
                engine.attach("predictor", built.online_predictor.stats)
        if cfg.predictor is not None and cfg.predictor.name != RESIDUAL_GATE and not prefetching:
            built.online_predictor = _track_predictor(engine, cfg)
        return built
    except BaseException:
        engine.close()
        raise


def _cache_bytes(cfg: RuntimeConfig) -> int:
    """Device bytes the expert cache's fast tier will take, so a CUDA engine leaves them out of
    its KV cache (0 without a cache, and on CPU, where the KV budget does not depend on it)."""
    if not cfg.offload or not cfg.device.startswith("cuda"):
        return 0
    from moe_rt.device import resolve_dtype, resolve_device
    from moe_rt.loader import load_spec

    spec = load_spec(cfg.model)
    device = resolve_device(cfg.device)
    expert = spec.bytes_per_expert(resolve_dtype(cfg.dtype, device).itemsize)
    L = len(spec.moe_layer_ids)
    slots = cfg.cache.resolve_capacity_slots(expert, L, spec.num_experts)
    return slots * expert * (L if cfg.cache.scope == "per_layer" else 1)


def _predictor(engine: LLMEngine, cfg: RuntimeConfig, depth: int):
    from router_predict.registry import build_predictor_for_model

    return build_predictor_for_model(cfg.predictor.name, engine.model, predictor_dir=cfg.predictor.dir, depth=depth)


def _track_predictor(engine: LLMEngine, cfg: RuntimeConfig):
    from router_predict.online import OnlinePredictor

    depth = cfg.predictor.depth
    predictor = _predictor(engine, cfg, depth).to(engine.device)  # beside the hidden states it reads
    online = OnlinePredictor(engine.model.hub, predictor, depth, model=engine.model, device=str(engine.device))
    online.start(forecaster=False)  # scored, never prefetched from
    engine.attach("predictor", online.stats, online.stop)
    return online
