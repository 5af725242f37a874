"""Expert stores: the one interface through which expert weights are reached.

An MoE layer asks its store to `prepare` the experts a batch needs and gets a LayerExperts: a
weight stack plus the slot of each logical expert in it. A store that keeps every expert resident
returns its full stack with identity slots; an expert cache returns its fast-tier buffers and maps
only resident experts (see expert_cache/). Only the store decides where weights live.

Shape legend: E logical experts, S slots in the stack, I expert intermediate size, D hidden.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from moe_rt.quant.experts import QuantizedStack
from moe_rt.quant.mixed import MixedStack, stack_bytes_by_width

from .events import Forecast

WeightStack = torch.Tensor | QuantizedStack | MixedStack  # [S, N, K] in any of the stored forms


@dataclass
class LayerExperts:
    w13: WeightStack  # [S, 2I, D] gate rows then up rows
    w2: WeightStack  # [S, D, I]
    slot_of: torch.Tensor | None = None  # [E] int64 slot of each logical expert (-1: not here); None = identity
    # Experts the store chose to run where their weights are (e.g. missed experts computed on the
    # host instead of copied to the GPU, the Fiddler idea), for exactly the choices whose slot_of
    # is -1. Two phases, so the host work overlaps the device kernels: host_compute(hidden,
    # topk_ids, topk_weights) is called BEFORE the device kernels of the layer are queued (it may
    # start copying its inputs) and returns `finish`; finish() is called AFTER they are queued and
    # returns the [T, D] partial output on hidden's device, added to theirs. None = every needed
    # expert is in a slot.
    host_compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]] | None = None

    def slots(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Map logical ids [T, K] (-1 = skip) to slot ids in w13/w2 (-1 = skip)."""
        if self.slot_of is None:
            return topk_ids
        return torch.where(topk_ids >= 0, self.slot_of[topk_ids.clamp(min=0)], topk_ids)


class ExpertStore(ABC):
    num_layers: int  # MoE layers
    num_experts: int

    @abstractmethod
    def prepare(self, moe_index: int, topk_ids: torch.Tensor) -> LayerExperts:
        """Make every expert in topk_ids (logical ids, -1 = none) usable and return the stack to use."""

    def prefetch(self, forecasts: Sequence[Forecast]) -> None:
        """Forecasts for later layers, made after layer l routed and handed over before prepare(l)
        (the order in events.py). A store that moves weights may load them early; one that keeps
        every expert where it computes has nothing to do."""

    def expert_bytes(self) -> int:
        return 0

    def bytes_by_width(self) -> dict[str, int]:
        """{"full" | "8" | "4": bytes of expert weights held at that width}."""
        n = self.expert_bytes()
        return {"full": n} if n else {}


class ResidentExpertStore(ExpertStore):
    """Every expert of every layer stacked on the compute device (the all-resident ceiling),
    in the compute dtype, quantized (moe_rt/quant/experts.py), or at per-expert widths
    (moe_rt/quant/mixed.py; slot_of then maps each layer's logical experts to their slots)."""

    def __init__(self, w13: list[WeightStack], w2: list[WeightStack], slot_of: list[torch.Tensor] | None = None) -> None:
        self.w13, self.w2 = w13, w2
        self.slot_of = slot_of  # per layer [E] int64, or None: slot e holds expert e
        self.num_layers = len(w13)
        self.num_experts = w13[0].shape[0]

    def prepare(self, moe_index: int, topk_ids: torch.Tensor) -> LayerExperts:
        return LayerExperts(self.w13[moe_index], self.w2[moe_index],
                            None if self.slot_of is None else self.slot_of[moe_index])

    def expert_bytes(self) -> int:
        """Bytes the stacks really hold (codes, scales and the CPU kernels' copies included)."""
        return sum(self.bytes_by_width().values())

    def bytes_by_width(self) -> dict[str, int]:
        """{"full" | "8" | "4": bytes} over every layer."""
        out: dict[str, int] = {}
        for t in self.w13 + self.w2:
            for k, v in stack_bytes_by_width(t).items():
                out[k] = out.get(k, 0) + v
        return out
