"""Id-only: which experts layer l+d uses given the experts layer l chose (cross-layer co-activation).

P(e' at l+d | e at l) = (C[e, e'] + beta * q(e')) / (n_e + beta), where C counts tokens using e at
l and e' at l+d, n_e counts tokens using e at l, and q(e') is the frequency baseline at l+d. Rare
experts (small n_e) thus back off to the frequency baseline. A token's score for e' is the sum of
P over its k experts at l.

Shape legend: N rows, T tokens, L MoE layers, k experts per token, E routed experts, D fitted depth.
"""
from __future__ import annotations

import torch

from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation, Predictor
from router_predict.predictors.common import multi_hot, trace_ids
from router_predict.predictors.frequency import FrequencyPredictor
from router_predict.trace import Trace


class CoactivationPredictor(Predictor):
    name = "coactivation"

    def __init__(self, cond: torch.Tensor, top_k: int) -> None:
        """cond: [L, D, E, E]; cond[l, d-1, e, e'] = P(e' at l+d | e at l); zero where l+d >= L."""
        super().__init__(cond.shape[0], cond.shape[2], top_k)
        self.cond = cond.float()
        self.max_depth = cond.shape[1]

    @classmethod
    def fit(cls, trace: Trace, depth: int, beta: float = 1.0) -> "CoactivationPredictor":
        if depth < 1:
            raise MoeRtError(f"coactivation depth must be >= 1, got {depth}")
        hot = multi_hot(trace_ids(trace.topk_ids), trace.num_experts)  # [N, L, E]
        marginal = FrequencyPredictor.fit(trace).probs  # [L, E]
        num_layers, e = trace.num_layers, trace.num_experts
        cond = torch.zeros(num_layers, depth, e, e)
        for layer in range(num_layers):
            n_e = hot[:, layer].sum(0)  # [E]
            for d in range(1, min(depth, num_layers - 1 - layer) + 1):
                co = hot[:, layer].T @ hot[:, layer + d]  # [E, E]
                cond[layer, d - 1] = (co + beta * marginal[layer + d]) / (n_e + beta)[:, None]
        return cls(cond, trace.top_k)

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        d = self.lookahead(obs.moe_index, depth)
        if d > self.max_depth:
            raise MoeRtError(f"coactivation predictor was fitted for depth {self.max_depth}, asked {d}")
        table = self.cond[obs.moe_index, :d]  # [d, E, E]
        # Sum of rows of the token's k experts: [d, T, k, E] summed over k. A dropped choice (-1,
        # dynamic top-k) contributes no row.
        ids = obs.topk_ids.long()
        rows = table[:, ids.clamp(min=0)] * (ids >= 0)[None, :, :, None].to(table.dtype)
        return rows.sum(2)
