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


def prune_choices(weights: torch.Tensor, ids: torch.Tensor, spec: RoutingSpec, threshold: float = 0.0,
                  top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic top-k: per token, drop the routed choices whose weight, normalised over the
    token's K choices, is below `threshold`, or that fall outside the fewest choices (heaviest
    first) whose normalised weights sum to at least `top_p`. The heaviest choice is always kept.
    A dropped choice gets id -1 and weight 0 (every compute backend, dispatcher and expert store
    skips -1).

    Kept weights follow the family's rule as if it had routed to fewer experts: with
    `norm_topk_prob` they are renormalised to the total the K choices had (1, times
    `routed_scaling_factor`), otherwise they stay the raw scores. Pure; (weights [T, K] float32,
    ids [T, K] int64) in and out."""
    total = weights.sum(dim=-1, keepdim=True)
    share = weights / total.clamp(min=1e-20)
    order = share.argsort(dim=-1, descending=True)
    ranked = share.gather(1, order)
    before = ranked.cumsum(dim=-1) - ranked  # mass of the heavier choices
    keep_ranked = (ranked >= threshold) & (before < top_p)
    keep_ranked[:, 0] = True
    keep = torch.zeros_like(keep_ranked).scatter(1, order, keep_ranked)
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    if spec.norm_topk_prob:
        kept = kept * (total / kept.sum(dim=-1, keepdim=True))
    return kept, torch.where(keep, ids, torch.full_like(ids, -1))


class DynamicTopK:
    """prune_choices with the engine's settings, counting what it keeps: `expert_evaluations` is
    the (token, expert) pairs computed, `routed_choices` the K per token the router chose. The
    counts stay on the routing device until stats() reads them (no host sync per layer)."""

    def __init__(self, threshold: float, top_p: float) -> None:
        self.threshold, self.top_p = threshold, top_p
        self._kept: torch.Tensor | None = None
        self._routed = 0
        self._tokens = 0

    @classmethod
    def from_config(cls, threshold: float, top_p: float) -> "DynamicTopK | None":
        """None when both settings are off: routing is then exactly the family's."""
        return cls(threshold, top_p) if threshold > 0 or top_p < 1 else None

    def __call__(self, weights: torch.Tensor, ids: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = prune_choices(weights, ids, spec, self.threshold, self.top_p)
        kept = (ids >= 0).sum()
        self._kept = kept if self._kept is None else self._kept + kept
        self._routed += ids.numel()
        self._tokens += ids.shape[0]
        return weights, ids

    def stats(self) -> dict:
        """Counts over every MoE layer's tokens (a token counts once per MoE layer)."""
        kept = int(self._kept) if self._kept is not None else 0
        return {"threshold": self.threshold, "top_p": self.top_p, "layer_tokens": self._tokens,
                "routed_choices": self._routed, "expert_evaluations": kept,
                "experts_per_token": kept / self._tokens if self._tokens else 0.0}
