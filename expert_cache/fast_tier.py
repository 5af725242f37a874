"""The fast tier's slot buffers: one pool per MoE layer (scope per_layer) or one shared (global),
or under an expert bits plan one pool per (layer or global, width), and the CacheState sized to
match them.

A pool is `w13 [S, 2I, D]` and `w2 [S, D, I]` on the compute device in the compute dtype, or for
quantized experts a byte arena of S records whose QuantizedStack views the model computes from.
FastTier only reads CacheState (which key holds which slot); ExpertCache applies the plans that
change it. Shape legend: L MoE layers, E experts per layer, S slots per pool, I expert
intermediate size, D hidden size.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from expert_cache.config import CacheConfig
from expert_cache.device_io import slot_map, to_device
from expert_cache.packs import aligned_empty
from expert_cache.policies import ExpertKey
from expert_cache.records import ExpertFormat
from expert_cache.state import CacheState
from expert_cache.widths import WidthPlan, check_pins, pool_slots
from moe_rt.layers.moe.store import LayerExperts
from moe_rt.quant.mixed import MixedStack
from moe_rt.quant.plan import WIDTHS


class FastTier:
    def __init__(self, spec, cfg: CacheConfig, source: str, *, device: torch.device,
                 dtype: torch.dtype, fmt: ExpertFormat | None, plan: WidthPlan | None) -> None:
        """source: the slow tier's name (CacheState counts bytes moved by it). fmt, plan: as
        ExpertCache takes them."""
        L, E = len(spec.moe_layer_ids), spec.num_experts
        self.spec, self.device, self.dtype = spec, device, dtype
        self.num_layers, self.num_experts = L, E
        self.fmt, self.plan = fmt, plan
        self._slot_maps: dict[int, tuple[list[int], torch.Tensor]] = {}  # layer -> (map, on device)
        if plan is not None:
            self._init_width_pools(cfg, plan, source)
        else:
            # Bytes of one expert as stored and moved: every count (capacity, bytes moved) uses it.
            self.bytes_per_expert = (spec.bytes_per_expert(torch.empty((), dtype=dtype).element_size())
                                     if fmt is None else fmt.record_bytes)
            self.capacity_slots = cfg.resolve_capacity_slots(self.bytes_per_expert, L, E)
            self.state = CacheState(L, self.capacity_slots, cfg.scope, self.bytes_per_expert, source)
            pools = L if cfg.scope == "per_layer" else 1
            # quantized: slot s of a pool is arenas[pool][s], the stacks are views of those bytes
            staged = [self._staging(fmt, self.capacity_slots) for _ in range(pools)]
            self.w13, self.w2, self.arenas = (list(t) for t in zip(*staged))

    def _init_width_pools(self, cfg: CacheConfig, plan: WidthPlan, source: str) -> None:
        """Pools per (layer or global, width) sized by widths.pool_slots; per layer the MixedStacks
        of its non-empty pools (parts widest first, as the resident store orders them) and each
        class's first virtual slot, so slot_of = part offset + slot in the width's pool."""
        L, C = self.num_layers, len(WIDTHS)
        slots = pool_slots(cfg, plan)
        check_pins(cfg, plan, slots)
        self.state = CacheState(L, max(slots.values()), cfg.scope, 0, source, class_of=plan.class_of,
                                classes=C, pool_slots=slots, class_bytes=plan.class_bytes)
        per_base = [sum(slots[b * C + c] for c in range(C)) for b in range(len(slots) // C)]
        self.capacity_slots = max(per_base)  # slots of the largest layer (or of the global pools)
        every = [plan.class_bytes[plan.class_of((l, e))] for l in range(L) for e in range(self.num_experts)]
        self.bytes_per_expert = sum(every) // len(every)  # mean real bytes per expert (rates, stats)
        staged = [self._staging(plan.fmt(WIDTHS[pool % C]), slots[pool]) for pool in range(len(slots))]
        self.w13, self.w2, self.arenas = (list(t) for t in zip(*staged))
        # per layer: its MixedStacks and each expert's first virtual slot (its part's offset)
        self._mixed: list[tuple[MixedStack, MixedStack, list[int]]] = []
        for l in range(L):
            base = (l if cfg.scope == "per_layer" else 0) * C
            used = [base + c for c in range(C) if slots[base + c] > 0]
            offsets, o = [0] * C, 0
            for p in used:
                offsets[p - base] = o
                o += slots[p]
            self._mixed.append((MixedStack(tuple(self.w13[p] for p in used)),
                                MixedStack(tuple(self.w2[p] for p in used)),
                                [offsets[plan.class_of((l, e))] for e in range(self.num_experts)]))

    def _staging(self, fmt: ExpertFormat | None, n: int):
        """n slots in one width's form: (w13, w2, records arena or None for dense slots)."""
        if fmt is None:
            D, I = self.spec.hidden_size, self.spec.moe.intermediate_size
            return self._buffer((n, 2 * I, D)), self._buffer((n, D, I)), None
        arena = fmt.arena(n)
        return (*fmt.stacks(arena), arena)

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A fast-tier buffer; on the CPU page-aligned, so the disk tier reads straight into its
        slots (packs.PackTier, O_DIRECT)."""
        if self.device.type == "cpu":
            return aligned_empty(shape, self.dtype)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def total_bytes(self) -> int:
        """Bytes of the fast tier (all slots)."""
        return sum(a.numel() if a is not None else b.numel() * b.element_size() + c.numel() * c.element_size()
                   for a, b, c in zip(self.arenas, self.w13, self.w2))

    def slot(self, key: ExpertKey, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a load of `key` into `slot` writes: (w13, w2) slot tensors, or for quantized
        pools (the slot's record bytes [stride], None), as the record tiers read."""
        pool = self.state.pool_of(key)
        if self.arenas[pool] is not None:
            return self.arenas[pool][slot], None
        return self.w13[pool][slot], self.w2[pool][slot]

    def resident_experts(self, l: int) -> LayerExperts:
        """Layer l's pools and slot map (under a plan: its MixedStacks, virtual slots). The map on
        the device is sent again only when CacheState's view of the layer changed."""
        slots = self.state.slot_map(l, self.num_experts)
        if self.plan is None:
            pool = self.state.pool_of((l, 0))
            w13, w2 = self.w13[pool], self.w2[pool]
        else:
            w13, w2, first = self._mixed[l]
            slots = [s if s < 0 else f + s for s, f in zip(slots, first)]
        sent = self._slot_maps.get(l)
        if sent is None or sent[0] != slots:
            sent = (slots, slot_map(slots, self.device))
            self._slot_maps[l] = sent
        return LayerExperts(w13, w2, sent[1])

    def layer_experts(self, keys: list[ExpertKey], streamed: list[ExpertKey],
                      load_now: Callable[..., object]):
        """A stack of exactly this layer's experts when some could not get a slot: resident ones
        copied from their slots, streamed ones read from the slow tier (`load_now(key, w13, w2)`,
        the transfer engine's). Returns (experts, seconds)."""
        t0 = time.perf_counter()
        groups: dict[int, list[ExpertKey]] = {}  # width class (0 without a plan) -> keys, in order
        for key in keys:
            groups.setdefault(0 if self.plan is None else self.plan.class_of(key), []).append(key)
        parts13, parts2, dst, slot_of = [], [], {}, torch.full((self.num_experts,), -1, dtype=torch.int64)
        for c in sorted(groups):  # widest first: the order of the resident parts
            fmt = self.fmt if self.plan is None else self.plan.fmt(WIDTHS[c])
            w13, w2, arena = self._staging(fmt, len(groups[c]))
            for i, key in enumerate(groups[c]):
                slot_of[key[1]] = sum(p.shape[0] for p in parts13) + i
                dst[key] = (arena[i], None) if arena is not None else (w13[i], w2[i])
            parts13.append(w13)
            parts2.append(w2)
        streamed_set = set(streamed)
        for key in keys:
            if key in streamed_set:
                load_now(key, *dst[key])
            else:
                for d, src in zip(dst[key], self.slot(key, self.state.slot_of(key))):
                    if d is not None:
                        d.copy_(src)
        if self.plan is None:
            w13, w2 = parts13[0], parts2[0]
        else:
            w13, w2 = MixedStack(tuple(parts13)), MixedStack(tuple(parts2))
        return LayerExperts(w13, w2, to_device(slot_of, self.device)), time.perf_counter() - t0

    # -- reporting --------------------------------------------------------------------------------
    def format_label(self) -> str:
        if self.plan is not None:
            return "plan(" + ", ".join("full" if w == "full" else self.plan.fmt(w).label()
                                       for w, b in zip(WIDTHS, self.plan.class_bytes) if b) + ")"
        return "dense" if self.fmt is None else self.fmt.label()

    def slots_by_width(self) -> dict[str, int]:
        """Fast-tier slots of each width, over all pools."""
        out: dict[str, int] = {}
        for pool, n in self.state.pool_slots.items():
            w = str(WIDTHS[pool % len(WIDTHS)])
            out[w] = out.get(w, 0) + n
        return out
