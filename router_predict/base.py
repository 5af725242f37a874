"""The one interface every routing predictor implements.

A predictor forecasts which experts coming MoE layers will use, before their routers run.
Online, the engine feeds it a LayerObservation right after MoE layer l routed (or, for predictors
that read the layer's output, right after layer l's decoder layer finished); offline, trace replay
builds the same observations from a recorded trace (docs/traces.md).

Shape legend: T tokens, K experts per token, E routed experts per layer, H router input size,
L MoE layers, d look-ahead distance (1..depth).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerObservation:
    """What is known right after MoE layer `moe_index` routed a batch of T tokens."""

    moe_index: int  # 0..L-1
    topk_ids: torch.Tensor  # [T, K] int64 experts chosen at this layer
    topk_weights: torch.Tensor  # [T, K] float32
    hidden: torch.Tensor | None = None  # [T, H] router input at this layer (None in id-only traces)
    token_ids: torch.Tensor | None = None  # [T] int64
    positions: torch.Tensor | None = None  # [T] int64
    prev_token_ids: torch.Tensor | None = None  # [T] int64 previous token of the row's sequence, -1 at its start
    layer_output: torch.Tensor | None = None  # [T, H] residual stream leaving layer l's decoder layer (after its MoE)


class Predictor(ABC):
    """Scores over experts for the next layers. Higher score = more likely to be used."""

    name: str = "predictor"
    needs_hidden: bool = False  # True: cannot run on traces without `hidden`
    needs_layer_output: bool = False  # True: reads obs.layer_output, only known once layer l's decoder layer ran

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k

    @abstractmethod
    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        """Scores [d, T, E] for MoE layers obs.moe_index+1 .. +d, d = min(depth, L-1-obs.moe_index)."""

    def lookahead(self, moe_index: int, depth: int) -> int:
        """d = min(depth, L-1-moe_index): how many later layers exist to predict (0 at the last layer)."""
        return max(0, min(depth, self.num_layers - 1 - moe_index))

    def to(self, device: torch.device | str) -> "Predictor":
        """Move every tensor and module this predictor holds to `device`, in place; returns self.

        A predictor fed a model's hidden states must sit on their device: a CPU-resident one
        fails on CUDA inputs (or, made to work, copies the hidden state back every layer).
        """
        device = torch.device(device)
        for name, value in vars(self).items():
            if isinstance(value, torch.nn.Module):
                value.to(device)
            elif isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def predict_path(self, token_ids: torch.Tensor, positions: torch.Tensor,
                     prev_token_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Scores [L, T, E] for every MoE layer before the forward pass starts, or None if unsupported.

        prev_token_ids: [T] int64 previous token per row (-1 at a sequence start), if known.
        """
        return None
