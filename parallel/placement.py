"""Expert-parallel placement: which rank holds which expert of every MoE layer (docs/placement.md).

This is the `expert_parallel:` section of the expert-placement YAML file (the `cache:` section
beside it belongs to the expert cache). It is plain data: planners (`parallel/grouping.py`,
`default_placement`) produce it, the traffic model and the dispatchers read it.

Shape legend: L MoE layers (moe_index 0..L-1), E routed experts per layer, N ranks.

Terms: an expert's *primary* rank is the first in its list and serves every token that has no
copy on its own rank; further ranks hold *replicas*. A *slot* is one expert copy on one rank;
`capacity_per_rank` bounds slots per rank per layer (expert weights are the memory that runs out).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe_rt.errors import MoeRtError, validate_mapping

SECTION = "expert_parallel"


class ExpertParallelPlacement(BaseModel):
    """Expert -> ranks per MoE layer. Structural checks run on construction; sizes in validate_against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranks: int = Field(ge=1, description="Expert-parallel world size N; ranks are 0..N-1.")
    layers: dict[int, dict[int, list[int]]] = Field(
        description="Per MoE layer (moe_index 0..L-1, not the decoder-layer index): expert id -> "
                    "the ranks holding a copy. The first rank is the primary; the rest are replicas.")
    capacity_per_rank: int | None = Field(
        default=None, ge=1,
        description="Most expert slots (primaries + replicas) one rank may hold in one layer; "
                    "null means unbounded.")
    planner: str = Field(
        default="default",
        description="How the placement was made (informational), e.g. 'default' or 's-EG'.")

    @model_validator(mode="after")
    def _check_structure(self) -> "ExpertParallelPlacement":
        # Checks that need no model sizes; they hold for any placement file we accept.
        for layer, experts in self.layers.items():
            if layer < 0:
                raise ValueError(f"layer {layer}: moe_index must be >= 0")
            slots = [0] * self.ranks
            for expert, ranks in experts.items():
                where = f"layer {layer} expert {expert}"
                if expert < 0:
                    raise ValueError(f"{where}: expert id must be >= 0")
                if not ranks:
                    raise ValueError(f"{where}: needs at least one rank")
                for r in ranks:
                    if not 0 <= r < self.ranks:
                        raise ValueError(f"{where}: rank {r} outside [0, {self.ranks})")
                    slots[r] += 1
                if len(set(ranks)) != len(ranks):
                    raise ValueError(f"{where}: ranks {ranks} hold the same expert twice")
            if self.capacity_per_rank is not None:
                for r, n in enumerate(slots):
                    if n > self.capacity_per_rank:
                        raise ValueError(f"layer {layer}: rank {r} holds {n} experts, more than "
                                         f"capacity_per_rank {self.capacity_per_rank}")
        return self

    # -- checks against a model ------------------------------------------------------------

    def validate_against(self, num_layers: int, num_experts: int) -> None:
        """Raise MoeRtError unless every expert of every MoE layer (and nothing else) is placed."""
        want_layers = set(range(num_layers))
        if set(self.layers) != want_layers:
            missing = sorted(want_layers - set(self.layers))
            extra = sorted(set(self.layers) - want_layers)
            part = f"missing layer(s) {missing[:8]}" if missing else f"unknown layer(s) {extra[:8]}"
            raise MoeRtError(f"expert_parallel: {part}; the model has {num_layers} MoE layers")
        want_experts = set(range(num_experts))
        for layer in range(num_layers):
            have = set(self.layers[layer])
            if have != want_experts:
                missing = sorted(want_experts - have)
                extra = sorted(have - want_experts)
                part = (f"expert(s) {missing[:8]} not placed" if missing
                        else f"unknown expert(s) {extra[:8]}")
                raise MoeRtError(f"expert_parallel: layer {layer}: {part}; the model has "
                                 f"{num_experts} experts per layer")

    # -- views for planners, the traffic model and dispatchers ---------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def primary_table(self) -> np.ndarray:
        """[L, E] int64 primary rank of each expert. Needs a placement that passed validate_against."""
        num_experts = len(self.layers[0]) if self.layers else 0
        table = np.empty((self.num_layers, num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            for expert in range(num_experts):
                table[layer, expert] = self.layers[layer][expert][0]
        return table

    def holder_mask(self) -> np.ndarray:
        """[L, E, N] bool, True where the rank holds a copy (primary or replica) of the expert."""
        num_experts = len(self.layers[0]) if self.layers else 0
        mask = np.zeros((self.num_layers, num_experts, self.ranks), dtype=bool)
        for layer in range(self.num_layers):
            for expert in range(num_experts):
                mask[layer, expert, self.layers[layer][expert]] = True
        return mask

    def experts_on_rank(self, layer: int, rank: int) -> list[int]:
        """Experts with a copy on `rank` in `layer`, ascending."""
        return sorted(e for e, ranks in self.layers[layer].items() if rank in ranks)

    def num_replicas(self) -> int:
        """Copies beyond the primaries, summed over layers."""
        return sum(len(r) - 1 for experts in self.layers.values() for r in experts.values())

    # -- YAML -------------------------------------------------------------------------------

    def to_section(self) -> dict[str, Any]:
        """Plain dict for the `expert_parallel:` key; model_validate(to_section()) round-trips."""
        return self.model_dump(mode="python")


def default_placement(num_layers: int, num_experts: int, ranks: int) -> ExpertParallelPlacement:
    """DeepSpeed-MoE's layout: contiguous blocks, expert e on rank e // (E / N) in every layer."""
    if num_layers < 1 or num_experts < 1 or ranks < 1:
        raise MoeRtError(f"placement needs >= 1 layer, expert and rank, got L={num_layers}, "
                         f"E={num_experts}, N={ranks}")
    if num_experts % ranks:
        raise MoeRtError(f"{ranks} ranks do not divide {num_experts} experts; expert parallelism "
                         "needs the same number of experts on every rank")
    per_rank = num_experts // ranks
    layer = {e: [e // per_rank] for e in range(num_experts)}
    return ExpertParallelPlacement(
        ranks=ranks, layers={l: dict(layer) for l in range(num_layers)},
        capacity_per_rank=per_rank, planner="default")


def placement_from_section(section: Any, where: str = "expert_parallel") -> ExpertParallelPlacement:
    """Validate a parsed `expert_parallel:` mapping; problems become one-line MoeRtErrors."""
    return validate_mapping(ExpertParallelPlacement, section, where)


def save_placement_yaml(path: str | os.PathLike, placement: ExpertParallelPlacement) -> None:
    """Write a file whose only top-level key is `expert_parallel:`."""
    text = yaml.safe_dump({SECTION: placement.to_section()}, sort_keys=False,
                          default_flow_style=None)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise MoeRtError(f"placement {os.fspath(path)}: cannot write ({e.strerror})") from None

