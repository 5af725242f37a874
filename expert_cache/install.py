"""Installing the expert cache into a loaded model, with the predictor that drives its prefetch."""
from __future__ import annotations

import logging

import torch

from expert_cache.config import CacheConfig
from expert_cache.cache import ExpertCache
from expert_cache.records import expert_format
from expert_cache.record_tiers import PlanDiskTier, PlanHostTier
from expert_cache.slow_tier import DiskTier, build_slow_tier
from expert_cache.widths import WidthPlan, width_plan
from moe_rt.errors import MoeRtError

log = logging.getLogger(__name__)


def install_expert_cache(model, reader, cfg: CacheConfig, *, device, dtype: torch.dtype,
                         predictor=None, progress: bool = False, expert_bits: int | None = None,
                         expert_group_size: int = 64, expert_bits_plan=None) -> ExpertCache:
    """Build the cache for `model` (loaded with load_experts=False), make it the model's store.

    predictor: a router_predict Predictor object to prefetch with (any policy; required by policy
    predictive), built by the assembly from the config's predictor section.
    expert_bits: the cache holds, moves and counts quantized experts (records.py), the same
    numbers the all-resident model with these bits computes with.
    expert_bits_plan: a BitsPlan (moe_rt/quant/plan.py): each expert cached, moved and computed at
    its own width (widths.py), the numbers the all-resident model with that plan computes with.
    """
    if cfg.offload == "none":
        raise MoeRtError("cache: offload none keeps every expert resident; there is no cache to install")
    spec = model.spec
    device = torch.device(device)
    if cfg.cpu_compute_on_miss == "auto" and device.type == "cpu":
        log.info("cache: cpu_compute_on_miss auto never runs a miss on the host here: the model "
                 "computes on the CPU, where the weights already are (use always to force it)")
    if expert_bits_plan is not None:
        refuse_with_plan(cfg)
        plan = width_plan(expert_bits_plan, spec, dtype, device, expert_group_size)
        cache = ExpertCache(spec, plan_tier(cfg, reader, spec, plan, dtype, progress), cfg, device=device,
                            dtype=dtype, plan=plan)
    else:
        fmt = None if expert_bits is None else expert_format(spec, expert_bits, expert_group_size, dtype, device)
        tier = build_slow_tier(cfg.offload, reader, spec, dtype, progress=progress, cfg=cfg,
                               pin=device.type == "cuda", fmt=fmt)
        cache = ExpertCache(spec, tier, cfg, device=device, dtype=dtype, fmt=fmt)
    if predictor is None and cfg.policy == "predictive":
        raise MoeRtError("cache policy predictive needs a predictor to prefetch with")
    if predictor is not None:
        _attach_predictor(cache, model, predictor, cfg)
    model.moe_ctx.store = cache
    return cache


def refuse_with_plan(cfg: CacheConfig) -> None:
    """What a bits plan does not combine with in the cache, one line each."""
    if cfg.cpu_compute_on_miss is not False:
        raise MoeRtError("cache: cpu_compute_on_miss does not combine with expert_bits_plan yet; set it to false")
    if cfg.pack_dir is not None:
        raise MoeRtError("cache: pack_dir does not combine with expert_bits_plan (a pack holds one width); "
                         "drop pack_dir: the plan reads the safetensors files")


def plan_tier(cfg: CacheConfig, reader, spec, plan: WidthPlan, dtype: torch.dtype, progress: bool):
    """The slow tier under a bits plan: host RAM at each expert's width, or the safetensors files
    (quantized on read). Packs hold one width, so a named pack_dir is refused and auto_pack unused;
    host compute of misses would need a host stack per width, and is refused (refuse_with_plan)."""
    if cfg.offload == "cpu":
        return PlanHostTier(reader, spec, plan, dtype, progress=progress)
    if cfg.offload != "disk":
        raise MoeRtError(f"cache: offload {cfg.offload!r} has no slow tier (use cpu or disk)")
    if cfg.auto_pack:
        log.info("cache: expert_bits_plan reads the safetensors files (no automatic pack: a pack holds one width)")
    return PlanDiskTier(DiskTier(reader, spec), plan)


def _attach_predictor(cache: ExpertCache, model, predictor, cfg: CacheConfig) -> None:
    from router_predict.online import OnlinePredictor

    L = cache.num_layers
    if L < 2:
        log.info("cache: one MoE layer, nothing to prefetch ahead")
        return
    trained = getattr(predictor, "max_depth", L - 1)
    want = cfg.forecast_depth
    depth = max(1, min(want, L - 1, trained))
    # The predictor becomes the model's forecaster: each MoE block hands its forecasts to the
    # model's store (this cache) before preparing the layer (moe_rt/layers/moe/events.py).
    # On the model's device: the hidden states it reads stay where they are (no copy back per layer).
    online = OnlinePredictor(model.hub, predictor.to(cache.device), depth=depth, model=model, device=str(cache.device))
    cache.start_prefetch(depth=cfg.lookahead, max_depth=depth, owner=online)
    online.start(forecaster=True)

