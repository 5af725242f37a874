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
    t, d = forecast.target, forecast.distance
    return {(t, e): Prediction(d, float(v)) for e, v in enumerate(forecast.scores.tolist()) if v > 0}


def prefetch_order(predicted: Mapping[ExpertKey, Prediction], resident: Iterable[ExpertKey] | set,
                   limit: int) -> list[ExpertKey]:
    """Forecast keys that are not resident, nearest layer first, then highest score, then key;
    at most `limit` of them (the prefetch queue bound). Nearest first because a near layer's
    expert that is late stalls sooner than a far one's."""
    resident = resident if isinstance(resident, (set, frozenset, dict)) else set(resident)
    todo = [k for k in predicted if k not in resident]
    todo.sort(key=lambda k: (predicted[k].distance, -predicted[k].score, k))
    return todo[:max(limit, 0)]


class ForecastAccuracy:
    """The forecaster's recent precision per distance: of the votes cast for a layer's keys at
    distance d (a token's predicted top-k), the fraction whose key that layer used, as a moving
    average over layer visits (each visit weighs the same, so a prefill's hundreds of votes, of
    which the union of many tokens makes most right, do not speak for the one-token decode steps
    after it). Turns votes into calibrated probabilities (with_probabilities); the runtime's
    prefetcher and replay keep one each and feed it the same way, so both compute the same
    probabilities.

    `record` a round's forecast when it is made; `observe` each layer's keys when it runs. A new
    forecaster starts trusted (precision 1) until measured."""

    def __init__(self, alpha: float = 0.05, prior: float = 1.0) -> None:
        # target layer -> [(distance, {key: votes})]
        self._pending: dict[int, list[tuple[int, dict[ExpertKey, float]]]] = {}
        self.alpha, self.prior = alpha, prior
        self._precision: dict[int, float] = {}
        self.visits: dict[int, int] = {}  # layer visits scored per distance

    def record(self, predicted: Mapping[ExpertKey, Prediction]) -> None:
        by_target: dict[tuple[int, int], dict[ExpertKey, float]] = {}
        for key, p in predicted.items():
            by_target.setdefault((key[0], p.distance), {})[key] = p.score
        for (target, d), votes in by_target.items():
            self._pending.setdefault(target, []).append((d, votes))

    def observe(self, layer: int, used: Iterable[ExpertKey]) -> None:
        used = set(used)
        for d, votes in self._pending.pop(layer, ()):
            total = sum(votes.values())
            if total <= 0:
                continue
            right = sum(v for k, v in votes.items() if k in used) / total
            old = self._precision.get(d, self.prior)
            self._precision[d] = (1 - self.alpha) * old + self.alpha * right
            self.visits[d] = self.visits.get(d, 0) + 1

    def drop_pending(self) -> None:
        self._pending.clear()

    def precision(self, distance: int) -> float:
        return self._precision.get(distance, self.prior)


def with_probabilities(predicted: Mapping[ExpertKey, Prediction],
                       accuracy: ForecastAccuracy | None) -> dict[ExpertKey, Prediction]:
    """Each prediction with prob = 1 - (1 - q)^votes, q the measured precision of one vote at its
    distance (1 without `accuracy`): the batch uses a key if any one of its votes is right, so
    votes raise the chance (at batch 1, one vote: prob = q). Pure given the accuracy's counts."""
    prec: dict[int, float] = {}
    out = {}
    for key, p in predicted.items():
        if p.distance not in prec:
            prec[p.distance] = 1.0 if accuracy is None else accuracy.precision(p.distance)
        out[key] = Prediction(p.distance, p.score, 1.0 - (1.0 - prec[p.distance]) ** max(p.score, 0.0))
    return out
