"""Width pools: the expert cache under an expert bits plan (docs/expert-cache.md, "Width pools").

Each expert has the width its plan gives it ("full", 8 or 4; moe_rt/quant/plan.py) and is
cached, moved and computed at that width only. CacheState's width classes (class c = the width's
index in WIDTHS: full 0, 8 1, 4 2) give each (layer, width) - or, for scope global, each width -
a pool of its own, so a key never evicts or takes a slot of another width.

Capacity: the configured capacity is read as a fraction f of the experts (capacity_slots / E per
layer, capacity_slots / (L * E) for scope global, capacity_gb / the bytes of every expert at its
own width); each pool gets floor(f * its experts) slots, at least 1 when its width has experts
there (0 when none), at most its experts. Every width thus keeps about the same fraction of its
experts, and a pool's bytes are its slots times its width's real bytes per expert.

Shape legend: L MoE layers, E experts per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from expert_cache.config import GIB, CacheConfig
from expert_cache.policies import ExpertKey
from expert_cache.records import ExpertFormat, expert_format
from moe_rt.errors import MoeRtError
from moe_rt.quant.plan import WIDTHS, BitsPlan, Width


@dataclass(frozen=True)
class WidthPlan:
    """A bits plan resolved for one model and fast tier."""

    widths: tuple[tuple[Width, ...], ...]  # [L][E] width of each expert
    formats: dict  # width -> ExpertFormat of the widths 8 and 4 the plan uses ("full": None)
    class_bytes: tuple[int, ...]  # bytes of one expert of each class (0 for a width not used)

    def width(self, key: ExpertKey) -> Width:
        return self.widths[key[0]][key[1]]

    def class_of(self, key: ExpertKey) -> int:
        return WIDTHS.index(self.widths[key[0]][key[1]])

    def fmt(self, width: Width) -> ExpertFormat | None:
        return self.formats.get(width)

    def experts_of(self, layer: int, width: Width) -> list[int]:
        return [e for e, w in enumerate(self.widths[layer]) if w == width]


def width_plan(plan: BitsPlan, spec, dtype: torch.dtype, device, group_size: int) -> WidthPlan:
    """`plan` for `spec`'s experts on `device` (group_size: the plan's, else this default)."""
    L, E = len(spec.moe_layer_ids), spec.num_experts
    plan.check_model(L, E)
    widths = tuple(tuple(plan.widths(l, E)) for l in range(L))
    used = {w for ws in widths for w in ws}
    g = plan.group_size or group_size
    formats = {w: expert_format(spec, w, g, dtype, device) for w in (8, 4) if w in used}
    full = spec.bytes_per_expert(torch.empty((), dtype=dtype).element_size())
    class_bytes = tuple(full if w == "full" else formats[w].record_bytes if w in formats else 0
                        for w in WIDTHS)
    return WidthPlan(widths, formats, class_bytes)


def pool_slots(cfg: CacheConfig, wp: WidthPlan) -> dict[int, int]:
    """Slots of each CacheState pool (base * len(WIDTHS) + class) under `cfg`'s capacity."""
    L, E, C = len(wp.widths), len(wp.widths[0]), len(WIDTHS)
    counts: dict[int, int] = {}  # pool -> experts of its width it serves
    for l, ws in enumerate(wp.widths):
        base = l if cfg.scope == "per_layer" else 0
        for w in ws:
            pool = base * C + WIDTHS.index(w)
            counts[pool] = counts.get(pool, 0) + 1
    if cfg.capacity_slots is not None:  # f = num / den, in integers
        num, den = cfg.capacity_slots, E if cfg.scope == "per_layer" else L * E
    else:
        num = int(cfg.capacity_gb * GIB)
        den = sum(wp.class_bytes[WIDTHS.index(w)] for ws in wp.widths for w in ws)
    pools = (L if cfg.scope == "per_layer" else 1) * C
    out = {p: 0 for p in range(pools)}
    for pool, n in counts.items():
        out[pool] = min(n, max(1, num * n // den))
    return out


def check_pins(cfg: CacheConfig, wp: WidthPlan, slots: dict[int, int]) -> None:
    """Pinned experts must fit their own width pools (one line otherwise)."""
    C, taken = len(WIDTHS), {}
    for key in cfg.pinned_keys():
        pool = (key[0] if cfg.scope == "per_layer" else 0) * C + wp.class_of(key)
        taken[pool] = taken.get(pool, 0) + 1
        if taken[pool] > slots[pool]:
            raise MoeRtError(f"cache: pinned expert {key[1]} of layer {key[0]} does not fit: its width "
                             f"({wp.width(key)}) has {slots[pool]} slot(s) there under the bits plan")
