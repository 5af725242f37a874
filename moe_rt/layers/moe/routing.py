"""Router scoring: logits [T, E] -> (topk_weights [T, K] float32, topk_ids [T, K] int64). Pure."""
from __future__ import annotations

import torch

from moe_rt.models.spec import RoutingSpec


def route(
    logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dtype != torch.float32:
        logits = logits.float()
    scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
    # The bias (DeepSeek-V3's load balancer) steers which experts are chosen, never their weights.
    choice = scores + correction_bias if correction_bias is not None else scores
    if spec.n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, spec.n_group, E // spec.n_group)
        if spec.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
        fill = float("-inf") if correction_bias is not None else 0.0
        choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(T, E), fill)
    top = choice.topk(spec.top_k, dim=-1)
    ids = top.indices
    # choice is scores itself unless a bias or a group mask changed it: then gather the scores
    weights = top.values if choice is scores else scores.gather(1, ids)
    if spec.norm_topk_prob:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + 1e-20 if spec.scoring == "sigmoid" else total)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids
