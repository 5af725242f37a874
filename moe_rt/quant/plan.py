"""Per-expert bitwidth plans: which routed expert of which MoE layer is stored at which width
(docs/quantization.md, "Per-expert bitwidth plans").

    version: 1
    group_size: 64          # int4 input columns per scale and zero (default: engine.expert_group_size)
    default: 4              # width of every expert the layers do not name: 8, 4 or full
    layers:                 # MoE-layer index (0 = the first MoE layer) -> width -> expert ids
      0: {8: [3, 5], full: [1]}
      1: {8: [0, 2]}

A plan is checked in two steps: its structure when it is read (`load_plan`, `BitsPlan.from_data`),
its layer and expert ranges against a model (`check_model`) when a model is loaded with it. Every
problem is one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe_rt.errors import MoeRtError, validate_mapping
from moe_rt.yaml_file import read_yaml_file

# No torch here: the config tree imports this module.
Width = Literal[8, 4, "full"]
WIDTHS: tuple[Width, ...] = ("full", 8, 4)  # widest first: the order a layer's parts take


def parse_width(v: Any) -> Width:
    """8, 4 or "full" from a YAML key or value (8, "8", "full"); anything else is refused."""
    if isinstance(v, bool):
        raise ValueError(f"unknown bits {v!r} (choose 8, 4 or full)")
    if isinstance(v, int) and v in (8, 4):
        return v
    if isinstance(v, str) and v.strip().lower() in ("8", "4", "full"):
        s = v.strip().lower()
        return s if s == "full" else int(s)
    raise ValueError(f"unknown bits {v!r} (choose 8, 4 or full)")


class BitsPlan(BaseModel):
    """Expert widths per MoE layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(1, description="plan format version")
    group_size: Literal[32, 64, 128] | None = Field(
        None, description="int4 experts: input columns per scale and zero (default: engine.expert_group_size)")
    default: Width = Field(4, description="width of every expert a layer does not name: 8, 4 or full")
    layers: dict[int, dict[Width, tuple[int, ...]]] = Field(
        default_factory=dict, description="MoE-layer index -> {width: expert ids}")

    @field_validator("default", mode="before")
    @classmethod
    def _default(cls, v):
        return parse_width(v)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"layers must map MoE-layer indices to {{bits: [expert ids]}}, got {type(v).__name__}")
        out = {}
        for layer, widths in v.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layer {layer!r} is not a MoE-layer index (an integer >= 0)")
            if widths is None:
                widths = {}
            if not isinstance(widths, dict):
                raise ValueError(f"layer {layer}: must map bits (8, 4, full) to expert ids")
            out[layer] = {parse_width(w): ids for w, ids in widths.items()}
        return out

    @model_validator(mode="after")
    def _no_duplicates(self) -> "BitsPlan":
        for layer, widths in self.layers.items():
            seen: dict[int, Width] = {}
            for w, ids in widths.items():
                for e in ids:
                    if e < 0:
                        raise ValueError(f"layer {layer}: expert id {e} is negative")
                    if e in seen:
                        where = "twice" if seen[e] == w else f"under both {seen[e]} and {w}"
                        raise ValueError(f"layer {layer}: expert {e} is listed {where}")
                    seen[e] = w
        return self

    @classmethod
    def from_data(cls, data: Any, where: str) -> "BitsPlan":
        if isinstance(data, BitsPlan):
            return data
        return validate_mapping(cls, data, where)

    def check_model(self, num_moe_layers: int, num_experts: int, where: str = "bits plan") -> None:
        """Layer indices and expert ids in range for a model (one line on the first problem)."""
        for layer, widths in sorted(self.layers.items()):
            if layer >= num_moe_layers:
                raise MoeRtError(f"{where}: layer {layer} is out of range (the model has {num_moe_layers} MoE layers)")
            for w, ids in widths.items():
                bad = [e for e in ids if e >= num_experts]
                if bad:
                    raise MoeRtError(f"{where}: layer {layer}: expert {bad[0]} is out of range "
                                     f"(the model has {num_experts} experts per layer)")

    def widths(self, layer: int, num_experts: int) -> list[Width]:
        """The width of each expert 0..E-1 of MoE layer `layer`."""
        out: list[Width] = [self.default] * num_experts
        for w, ids in self.layers.get(layer, {}).items():
            for e in ids:
                out[e] = w
        return out

    def counts(self, num_moe_layers: int, num_experts: int) -> dict[str, int]:
        """Experts per width over the whole model, widest first."""
        out = {str(w): 0 for w in WIDTHS}
        for l in range(num_moe_layers):
            for w in self.widths(l, num_experts):
                out[str(w)] += 1
        return out

    def to_yaml(self, header: str = "") -> str:
        """The plan as YAML, lines of `header` as comments above it; load_plan reads it back."""
        doc = {"version": self.version, **({"group_size": self.group_size} if self.group_size else {}),
               "default": self.default,
               "layers": {l: {w: list(ids) for w, ids in sorted(ws.items(), key=lambda kv: WIDTHS.index(kv[0]))}
                          for l, ws in sorted(self.layers.items())}}
        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
        comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
        return comments + body


def load_plan(source: str | Path | dict | BitsPlan) -> BitsPlan:
    """A bits plan from a YAML file path, a mapping (a plan inline in a config file) or a BitsPlan."""
    if isinstance(source, (BitsPlan, dict)):
        return BitsPlan.from_data(source, "bits plan")
    return BitsPlan.from_data(read_yaml_file(source, "bits plan"), f"bits plan {source}")


def hottest_first(counts: Sequence[int]) -> list[int]:
    """Expert ids by activation count, most first; ties by id (deterministic plans)."""
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


def plan_by_fraction(counts: Sequence[Sequence[int]], hot_fraction: float, hot: Width, cold: Width,
                     group_size: int | None = None) -> BitsPlan:
    """counts [L][E] activations -> each layer's round(hot_fraction * E) most-activated experts at
    `hot`, the rest at `cold` (the plan's default)."""
    layers = {}
    for l, c in enumerate(counts):
        n = int(round(hot_fraction * len(c)))
        if n and hot != cold:
            layers[l] = {hot: tuple(sorted(hottest_first(c)[:n]))}
    return BitsPlan(group_size=group_size, default=cold, layers=layers)


def plan_by_budget(counts: Sequence[Sequence[int]], budget: int, nbytes: dict, hot: Width, cold: Width,
                   group_size: int | None = None) -> BitsPlan:
    """counts [L][E] -> every expert at `cold`, then the most-activated experts of the whole model
    (by count, ties by layer and id) raised to `hot` while the total stays within budget bytes.
    nbytes: {width: bytes of one expert}. A budget below the all-cold size is refused."""
    base = sum(len(c) for c in counts) * nbytes[cold]
    if budget < base:
        raise MoeRtError(f"--budget-bytes {budget} is below the {base} bytes every expert takes at {cold} bits")
    step = nbytes[hot] - nbytes[cold]
    if hot == cold or step <= 0:
        return BitsPlan(group_size=group_size, default=cold)
    ranked = sorted((-c[e], l, e) for l, c in enumerate(counts) for e in range(len(c)))
    layers: dict[int, list[int]] = {}
    for _, l, e in ranked[: (budget - base) // step]:
        layers.setdefault(l, []).append(e)
    return BitsPlan(group_size=group_size, default=cold,
                    layers={l: {hot: tuple(sorted(ids))} for l, ids in sorted(layers.items())})
