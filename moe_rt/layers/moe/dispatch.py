"""Token dispatchers: where routed tokens travel before expert compute and how results return.

    dispatch(hidden [T, D], topk_ids [T, K], topk_weights [T, K]) -> DispatchOutput
    combine(expert_out [T', D], DispatchOutput) -> [T, D]

The local dispatcher is the identity. Expert-parallel dispatchers (parallel/) move tokens between
ranks behind the same two calls, so the MoE block never knows how many ranks there are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchOutput:
    hidden: torch.Tensor  # [T', D] tokens to compute here
    topk_ids: torch.Tensor  # [T', K] logical expert ids to compute here (-1 = elsewhere)
    topk_weights: torch.Tensor  # [T', K]
    handle: Any = None  # dispatcher-private state needed by combine


class LocalDispatcher:
    def dispatch(self, moe_index: int, hidden, topk_ids, topk_weights) -> DispatchOutput:
        return DispatchOutput(hidden, topk_ids, topk_weights)

    def combine(self, moe_index: int, expert_out: torch.Tensor, d: DispatchOutput) -> torch.Tensor:
        return expert_out
