"""Id-only baseline: each layer's expert popularity, the same for every token.

Shape legend: T tokens, L MoE layers, E routed experts, d look-ahead distance.
"""
from __future__ import annotations

import torch

from router_predict.base import LayerObservation, Predictor
from router_predict.predictors.common import multi_hot, trace_ids
from router_predict.trace import Trace


class FrequencyPredictor(Predictor):
    name = "frequency"

    def __init__(self, probs: torch.Tensor, top_k: int) -> None:
        """probs: [L, E] probability that a token uses expert e at layer l (rows sum to top_k)."""
        super().__init__(probs.shape[0], probs.shape[1], top_k)
        self.probs = probs.float()

    @classmethod
    def fit(cls, trace: Trace, alpha: float = 1.0) -> "FrequencyPredictor":
        """Add-alpha smoothed share of tokens using each expert, so unseen experts keep a small score."""
        counts = multi_hot(trace_ids(trace.topk_ids), trace.num_experts).sum(0)  # [L, E]
        probs = (counts + alpha * trace.top_k / trace.num_experts) / (trace.num_rows + alpha)
        return cls(probs, trace.top_k)

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        d = self.lookahead(obs.moe_index, depth)
        rows = self.probs[obs.moe_index + 1: obs.moe_index + 1 + d]  # [d, E]
        return rows[:, None, :].expand(d, obs.topk_ids.shape[0], self.num_experts).clone()

    def predict_path(self, token_ids: torch.Tensor, positions: torch.Tensor,
                     prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.probs[:, None, :].expand(self.num_layers, token_ids.shape[0], self.num_experts).clone()
