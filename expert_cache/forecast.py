"""From a predictor's per-token scores to per-key forecasts, and which of them to prefetch.

Both the replay simulator and the in-engine prefetcher use these, so replay predicts what the
runtime would do. Pure functions; `aggregate_scores` needs torch only because scores are tensors.

Shape legend: d look-ahead layers, T tokens in the batch, E experts per layer, k experts per token.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from expert_cache.policies import ExpertKey, Prediction
from moe_rt.layers.moe.events import Forecast


def aggregate_scores(scores: torch.Tensor, top_k: int, first_layer: int) -> dict[ExpertKey, Prediction]:
    """Batch forecast from per-token scores.

    scores: [d, T, E] for MoE layers first_layer .. first_layer+d-1 (Predictor.predict output).
    Each token votes for its own top-k experts; a key's score is its number of votes, and only
    keys with at least one vote are forecast. Votes rather than summed scores, so one confident
    token cannot outweigh many, matching that the batch needs the union of the tokens' experts.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [d, T, E], got shape {tuple(scores.shape)}")
    d, t, e = scores.shape
    if d == 0 or t == 0:
        return {}
    k = min(top_k, e)
    top = torch.topk(scores.float(), k, dim=-1).indices  # [d, T, k]
    votes = torch.zeros(d, e, dtype=torch.int64)
    votes.scatter_add_(1, top.reshape(d, t * k), torch.ones(d, t * k, dtype=torch.int64))
    out: dict[ExpertKey, Prediction] = {}
    for j in range(d):
        out.update(predictions(Forecast(first_layer + j, votes[j], j + 1)))
    return out


def predictions(forecast: Forecast) -> dict[ExpertKey, Prediction]:
    """One layer's batch forecast as per-key Predictions: every expert with a positive score
    (votes), at the forecast's distance. Replay and the runtime's prefetcher both read forecasts so."""
    scores = forecast.scores
    return {(forecast.target, e): Prediction(forecast.distance, float(scores[e]))
            for e in torch.nonzero(scores > 0).flatten().tolist()}


def prefetch_order(predicted: Mapping[ExpertKey, Prediction], resident: Iterable[ExpertKey] | set,
                   limit: int) -> list[ExpertKey]:
    """Forecast keys that are not resident, nearest layer first, then highest score, then key;
    at most `limit` of them (the prefetch queue bound). Nearest first because a near layer's
    expert that is late stalls sooner than a far one's."""
    resident = resident if isinstance(resident, (set, frozenset, dict)) else set(resident)
    todo = [k for k in predicted if k not in resident]
    todo.sort(key=lambda k: (predicted[k].distance, -predicted[k].score, k))
    return todo[:max(limit, 0)]
