"""The naive offloading baseline: no cache, every expert use read from the slow tier."""
from __future__ import annotations

import time

import torch

from expert_cache.device_io import ids_on_host, to_device, used_experts
from expert_cache.slow_tier import SlowTier
from moe_rt.layers.moe.store import ExpertStore, LayerExperts


class OnDemandExpertStore(ExpertStore):
    """No cache at all: every prepare reads every expert the layer uses from the slow tier into
    a staging stack (the naive baseline of `moe-rt bench offload`)."""

    def __init__(self, spec, tier: SlowTier, *, device: torch.device, dtype: torch.dtype) -> None:
        self.num_layers, self.num_experts = len(spec.moe_layer_ids), spec.num_experts
        D, I, E = spec.hidden_size, spec.moe.intermediate_size, spec.num_experts
        self.tier, self.device = tier, torch.device(device)
        self.w13 = torch.empty(E, 2 * I, D, dtype=dtype, device=self.device)
        self.w2 = torch.empty(E, D, I, dtype=dtype, device=self.device)
        self._expert_bytes = spec.bytes_per_expert(self.w13.element_size())
        self.loads, self.stall_s = 0, 0.0

    def prepare(self, moe_index: int, topk_ids: torch.Tensor) -> LayerExperts:
        t0 = time.perf_counter()
        ids = used_experts(ids_on_host(topk_ids))  # the one host read of the layer (device_io.py)
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.int64)
        for i, e in enumerate(ids):
            self.tier.read_into((moe_index, e), self.w13[i], self.w2[i])
            slot_of[e] = i
        self.loads += len(ids)
        self.stall_s += time.perf_counter() - t0
        return LayerExperts(self.w13, self.w2, to_device(slot_of, self.device))

    def stats(self) -> dict:
        return {"misses": self.loads, "hits": 0, "loads": self.loads, "stall_s": self.stall_s,
                "bytes_moved": {self.tier.name: self.loads * self._expert_bytes},
                "bytes_moved_total": self.loads * self._expert_bytes}

    def close(self) -> None:
        self.tier.close()
