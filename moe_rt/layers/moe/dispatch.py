"""Token dispatchers: where routed tokens travel before expert compute and how results return.

Shape legend: T tokens the block was given, T' rows computed here after dispatch, D hidden,
K experts per token.

    d = dispatcher.dispatch(moe_index, hidden [T, D], topk_ids [T, K], topk_weights [T, K])
    y = compute(d.hidden [T', D], ..., d.topk_ids [T', K], d.topk_weights [T', K])    [T', D]
    out = dispatcher.combine(moe_index, y, d)                                           [T, D]

The MoE block only ever makes these two calls, so it never knows how many ranks there are or
how rows were moved. A communication scheme is one class that satisfies `Dispatcher`; what it
needs to undo its own dispatch travels in `DispatchOutput.handle`, typed by the scheme.

Invariants every dispatcher keeps:
  * combine's result has one row per token given to dispatch, in the order they were given.
  * out[t] = sum over the pairs (t, k) of topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]),
    each pair computed exactly once somewhere (a row's id -1 means "computed elsewhere").
  * dispatch and combine of one layer are called in that order, once each, on the same handle.
The local dispatcher is the identity routing: combine(dispatch(x)) hands back compute's rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch

H = TypeVar("H")  # a scheme's own state between dispatch and combine


@dataclass(frozen=True)
class DispatchOutput(Generic[H]):
    """What this rank computes for one MoE layer, plus the scheme's state to bring results back."""

    hidden: torch.Tensor  # [T', D] rows to compute here (T' = T for the local dispatcher)
    topk_ids: torch.Tensor  # [T', K] int64 logical expert ids to compute here (-1 = elsewhere)
    topk_weights: torch.Tensor  # [T', K] routing weights of those ids
    handle: H  # the scheme's private state for combine (None for the local dispatcher)


@runtime_checkable
class Dispatcher(Protocol[H]):
    """The communication contract of the MoE block (see the module docstring for invariants)."""

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchOutput[H]:
        """hidden [T, D], topk_ids [T, K], topk_weights [T, K] -> the rows to compute here."""
        ...

    def combine(self, moe_index: int, expert_out: torch.Tensor, dispatched: DispatchOutput[H]) -> torch.Tensor:
        """expert_out [T', D] (the weighted sums of dispatched's rows) -> [T, D] in dispatch's token order."""
        ...


class LocalDispatcher:
    """Every expert is here: nothing moves."""

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchOutput[None]:
        return DispatchOutput(hidden, topk_ids, topk_weights, None)

    def combine(self, moe_index: int, expert_out: torch.Tensor, dispatched: DispatchOutput[None]) -> torch.Tensor:
        return expert_out
