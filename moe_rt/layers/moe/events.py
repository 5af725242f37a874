"""What an MoE layer tells its observers after routing a batch.

Observers (trace recorder, predictor, expert cache) subscribe through RoutingHub. A layer checks
`hub.active` first, so routing costs nothing extra when nobody listens.

Shape legend: T tokens in the forward batch, D hidden size, K experts per token, E routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class BatchInfo:
    """Which request/position each of the T rows of a forward batch is. Set by the engine per step."""

    step: int  # forward-batch counter; rows of one forward share it
    seq_ids: torch.Tensor  # [T] int64 request (sequence) id per row
    positions: torch.Tensor  # [T] int64 position in its sequence
    token_ids: torch.Tensor  # [T] int64 input token per row


@dataclass(frozen=True)
class RouterEvent:
    moe_index: int  # 0..L-1 among the model's MoE layers
    layer_id: int  # index among all decoder layers
    hidden: torch.Tensor  # [T, D] the router's input (after the layer's pre-MoE norm)
    router_logits: torch.Tensor  # [T, E]
    topk_ids: torch.Tensor  # [T, K] int64 logical expert ids, routing order
    topk_weights: torch.Tensor  # [T, K] float32 combine weights
    batch: BatchInfo | None  # None when the model runs outside the engine


Observer = Callable[[RouterEvent], None]


class RoutingHub:
    """Fan-out of router events from every MoE layer of one model (owned by the model, not global)."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []
        self.batch: BatchInfo | None = None

    @property
    def active(self) -> bool:
        return bool(self._observers)

    def subscribe(self, fn: Observer) -> Callable[[], None]:
        """Add an observer; returns a function that removes it."""
        self._observers.append(fn)
        return lambda: self._observers.remove(fn) if fn in self._observers else None

    def emit(self, event: RouterEvent) -> None:
        for fn in list(self._observers):
            fn(event)
