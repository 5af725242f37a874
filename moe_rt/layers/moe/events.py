"""What an MoE layer tells the parts built on the model after routing, and what they answer.

Per MoE layer l, between routing and expert compute, MoEBlock.forward runs a fixed order:

    route(l) -> hub.observe(event) -> hub.forecast(event) -> store.prefetch(forecasts)
             -> dispatch -> store.prepare(l) -> compute -> combine

- observers (trace recorder, a predictor tracked for its live recall, bench counters) see the
  event; they return nothing and change nothing the forward uses;
- the hub's one forecaster (an online predictor driving the expert cache) answers Forecasts for
  layers l+1..l+D. They must be made here, inside the forward, because they read layer l's routing
  (and hidden state), which exists only once layer l has routed;
- the store gets them before prepare(l), so prepare(l) can issue their copies right after l's own
  demand loads, overlapping l's compute (expert_cache/cache.py).

The router_predict and expert_cache packages exchange only the Forecast below; neither imports the
other for it, and moe_rt_app/assemble.py (through expert_cache/install.py) connects them.

A layer checks `hub.active` first, so routing costs nothing extra when nobody listens.

The rows of a forward (BatchInfo) reach the events through `hub.forward(batch)`, a context the
model runner holds for exactly one forward: the value is back to what it was on exit, also when
the forward raises, so no event can carry another forward's rows.

Shape legend: T tokens in the forward batch, D hidden size, K experts per token, E routed experts.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch


@dataclass(frozen=True)
class BatchInfo:
    """The step context of one forward batch: which request/position each of its T rows is.
    Built by the model runner once per engine step, scoped to that step's forward."""

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
    batch: BatchInfo | None  # None when the forward belongs to no engine step


@dataclass(frozen=True)
class Forecast:
    """Which experts MoE layer `target` is expected to use, for the batch being routed."""

    target: int  # moe_index of the forecast layer
    scores: torch.Tensor  # [E] float32 on CPU: tokens of the batch with expert e in their predicted top-k
    distance: int  # target minus the layer the forecast was made after (1..D)


Observer = Callable[[RouterEvent], None]


class Forecaster(Protocol):
    def forecast(self, event: RouterEvent) -> Sequence[Forecast]:
        """Forecasts ready once layer event.moe_index has routed (for later layers, nearest first)."""


class RoutingHub:
    """The per-layer hooks of one model (owned by the model, not global): observers, at most one
    forecaster, and the BatchInfo of the forward in progress."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []
        self._forecaster: Forecaster | None = None
        self._batch: BatchInfo | None = None

    @property
    def active(self) -> bool:
        return bool(self._observers) or self._forecaster is not None

    @property
    def batch(self) -> BatchInfo | None:
        """The rows of the forward in progress; None outside hub.forward or for a forward of no step."""
        return self._batch

    @contextmanager
    def forward(self, batch: BatchInfo | None) -> Iterator[None]:
        """Scope `batch` to one forward: its router events carry it; restored on exit, even on error."""
        outer, self._batch = self._batch, batch
        try:
            yield
        finally:
            self._batch = outer

    def subscribe(self, fn: Observer) -> Callable[[], None]:
        """Add an observer; returns a function that removes it."""
        self._observers.append(fn)
        return lambda: self._observers.remove(fn) if fn in self._observers else None

    def set_forecaster(self, forecaster: Forecaster) -> Callable[[], None]:
        """Make `forecaster` the one whose forecasts the MoE layers hand to the expert store;
        returns a function that removes it. One per hub: a store prefetches for one forecast."""
        if self._forecaster is not None:
            raise RuntimeError("this model already has a forecaster driving its expert store")
        self._forecaster = forecaster

        def remove() -> None:
            if self._forecaster is forecaster:
                self._forecaster = None
        return remove

    def observe(self, event: RouterEvent) -> None:
        """Stage 1 after routing: every observer, in subscription order."""
        for fn in list(self._observers):
            fn(event)

    def forecast(self, event: RouterEvent) -> Sequence[Forecast]:
        """Stage 2 after routing (after observe): the forecaster's forecasts, or none."""
        return self._forecaster.forecast(event) if self._forecaster is not None else ()
