"""The expert-placement file (YAML, docs/placement.md): one document, two sections.

    cache:            how experts are split between a bounded fast tier and a slower tier
                      (expert_cache.config.CacheConfig)
    expert_parallel:  which rank holds which expert of each MoE layer
                      (parallel.placement.ExpertParallelPlacement)

Both are optional. Loading validates the whole file once and reports the first problem in one line;
`check_model` then validates it against a model (every expert placed, ids in range).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from expert_cache.config import CacheConfig, load_cache_config
from moe_rt.errors import MoeRtError
from parallel.placement import ExpertParallelPlacement, placement_from_section

SECTIONS = ("cache", "expert_parallel")


@dataclass(frozen=True)
class PlacementFile:
    cache: CacheConfig | None = None
    expert_parallel: ExpertParallelPlacement | None = None

    def check_model(self, num_moe_layers: int, num_experts: int) -> None:
        if self.cache is not None:
            self.cache.check_model(num_moe_layers, num_experts)
        if self.expert_parallel is not None:
            self.expert_parallel.validate_against(num_moe_layers, num_experts)


def load_placement(path: str | Path) -> PlacementFile:
    p = Path(path)
    if not p.is_file():
        raise MoeRtError(f"placement file {path} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MoeRtError(f"placement file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise MoeRtError(f"placement file {path} must be a mapping with keys {', '.join(SECTIONS)}")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise MoeRtError(f"placement file {path}: unknown section '{unknown[0]}' (expected {', '.join(SECTIONS)})")
    cache = load_cache_config(doc["cache"], f"{path}: cache") if "cache" in doc else None
    ep = placement_from_section(doc["expert_parallel"], f"{path}: expert_parallel") if "expert_parallel" in doc else None
    return PlacementFile(cache, ep)


def save_placement(path: str | Path, placement: PlacementFile) -> None:
    doc = {}
    if placement.cache is not None:
        doc["cache"] = placement.cache.model_dump(exclude_defaults=True) or {}
    if placement.expert_parallel is not None:
        doc["expert_parallel"] = placement.expert_parallel.to_section()
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
