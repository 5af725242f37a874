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
from router_predict.graded import NUM_GRADES, GradedForecast, grade_counts, vote_grades, votes_of


def aggregate_scores(scores: torch.Tensor, top_k: int, first_layer: int) -> dict[ExpertKey, Prediction]:
    """Batch forecast from per-token scores.

    scores: [d, T, E] for MoE layers first_layer .. first_layer+d-1 (Predictor.predict output).
    Each token votes for its own top-k experts; a key's score is its number of votes, and only
    keys with at least one vote are forecast. Votes rather than summed scores, so one confident
    token cannot outweigh many, matching that the batch needs the union of the tokens' experts.
    Each vote is graded by its expert's share of the token's scores (router_predict.graded), as
    the online forecaster grades it, so calibration sees the same grades in replay and runtime.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [d, T, E], got shape {tuple(scores.shape)}")
    d, t, e = scores.shape
    if d == 0 or t == 0:
        return {}
    k = min(top_k, e)
    flat = scores.float().reshape(d * t, e)
    ranked = torch.topk(flat, min(2 * k, e), dim=-1).indices.tolist()  # [d*T]: k votes, k runner-ups
    grades = vote_grades(flat, ranked, k)
    out: dict[ExpertKey, Prediction] = {}
    for j in range(d):
        rows = [row[:k] for row in ranked[j * t:(j + 1) * t]]
        votes = [0.0] * e
        for row in rows:
            for x in row:
                votes[x] += 1.0
        out.update(predictions(GradedForecast(first_layer + j, torch.tensor(votes), j + 1,
                                              grade_counts(ranked[j * t:(j + 1) * t], grades[j * t:(j + 1) * t]))))
    return out


def predictions(forecast: Forecast) -> dict[ExpertKey, Prediction]:
    """One layer's batch forecast as per-key Predictions: every expert with a positive score
    (votes), at the forecast's distance, with its votes' grades when the forecast has them
    (router_predict.graded.GradedForecast). Replay and the runtime's prefetcher both read
    forecasts so."""
    t, d = forecast.target, forecast.distance
    grades = getattr(forecast, "grades", None)
    if grades:  # votes and runner-ups (score 0: ranked for eviction, never prefetched)
        return {(t, e): Prediction(d, float(votes_of(g)), grades=g) for e, g in grades.items()}
    return {(t, e): Prediction(d, float(v)) for e, v in enumerate(forecast.scores.tolist()) if v > 0}


def prefetch_order(predicted: Mapping[ExpertKey, Prediction], resident: Iterable[ExpertKey] | set,
                   limit: int) -> list[ExpertKey]:
    """Forecast keys with votes that are not resident, nearest layer first, then highest score, then key;
    at most `limit` of them (the prefetch queue bound). Nearest first because a near layer's
    expert that is late stalls sooner than a far one's."""
    resident = resident if isinstance(resident, (set, frozenset, dict)) else set(resident)
    todo = [k for k, p in predicted.items() if p.score > 0 and k not in resident]
    todo.sort(key=lambda k: (predicted[k].distance, -predicted[k].score, k))
    return todo[:max(limit, 0)]


class ForecastAccuracy:
    """The forecaster's recent precision per distance, and per distance and grade: of the votes
    cast for a layer's keys at distance d (a token's predicted top-k), the fraction whose key
    that layer used. Turns votes into calibrated probabilities (with_probabilities); the
    runtime's prefetcher and replay keep one each and feed it the same way, so both compute the
    same probabilities.

    Per distance: a moving average over layer visits (each visit weighs the same, so a
    prefill's hundreds of votes, of which the union of many tokens makes most right, do not
    speak for the one-token decode steps after it). Per grade (router_predict.graded: the
    vote's share of its token's scores): decayed counts of right and cast votes, shrunk towards
    the distance's precision by `shrink` pseudo-votes, so a grade seen rarely reads as the
    distance's precision and one seen often as its own frequency (bucketed calibration).

    `record` a round's forecast when it is made; `observe` each layer's keys when it runs. A new
    forecaster starts trusted (precision 1) until measured."""

    def __init__(self, alpha: float = 0.05, prior: float = 1.0, decay: float = 0.995,
                 shrink: float = 4.0) -> None:
        # target layer -> [(distance, {key: Prediction})]
        self._pending: dict[int, list[tuple[int, dict[ExpertKey, Prediction]]]] = {}
        self.alpha, self.prior, self.decay, self.shrink = alpha, prior, decay, shrink
        self._precision: dict[int, float] = {}
        # distance, and (target layer, distance) -> [right, cast] decayed pick counts per grade
        self._graded: dict[int | tuple[int, int], list[list[float]]] = {}
        self.visits: dict[int, int] = {}  # layer visits scored per distance

    def record(self, predicted: Mapping[ExpertKey, Prediction]) -> None:
        by_target: dict[tuple[int, int], dict[ExpertKey, Prediction]] = {}
        for key, p in predicted.items():
            by_target.setdefault((key[0], p.distance), {})[key] = p
        for (target, d), preds in by_target.items():
            self._pending.setdefault(target, []).append((d, preds))

    def observe(self, layer: int, used: Iterable[ExpertKey]) -> None:
        used = set(used)
        for d, preds in self._pending.pop(layer, ()):
            total = sum(p.score for p in preds.values())
            if total <= 0:
                continue
            right = sum(p.score for k, p in preds.items() if k in used) / total
            old = self._precision.get(d, self.prior)
            self._precision[d] = (1 - self.alpha) * old + self.alpha * right
            self.visits[d] = self.visits.get(d, 0) + 1
            picks = sum(sum(p.grades) for p in preds.values())
            if picks:
                self._count_grades(d, preds, used, picks)
                self._count_grades((layer, d), preds, used, picks)

    def _count_grades(self, cell, preds: Mapping[ExpertKey, Prediction], used: set, picks: int) -> None:
        counts = self._graded.get(cell)
        if counts is None:
            counts = self._graded[cell] = [[0.0] * NUM_GRADES, [0.0] * NUM_GRADES]
        hits, cast = counts
        for g in range(NUM_GRADES):
            hits[g] *= self.decay
            cast[g] *= self.decay
        for k, p in preds.items():  # each visit weighs 1 in all, as above
            for g, n in enumerate(p.grades):
                if n:
                    cast[g] += n / picks
                    if k in used:
                        hits[g] += n / picks

    def drop_pending(self) -> None:
        self._pending.clear()

    def precision(self, distance: int) -> float:
        return self._precision.get(distance, self.prior)

    def graded_precision(self, distance: int, target: int | None = None) -> tuple[float, ...]:
        """Per grade, the chance one pick of that grade at `distance` is right: over all layers
        shrunk towards precision(distance) while its picks are few, and for a `target` layer
        its own frequency shrunk towards that (layers differ: a forecast from an early layer's
        hidden state is less sure of its next layer than a late one is)."""
        base = self.precision(distance)
        m = self.shrink
        counts = self._graded.get(distance)
        if counts is None:
            return (base,) * NUM_GRADES
        pooled = tuple((h + m * base) / (c + m) for h, c in zip(*counts))
        own = None if target is None else self._graded.get((target, distance))
        if own is None:
            return pooled
        return tuple((h + m * q) / (c + m) for h, c, q in zip(*own, pooled))


def with_probabilities(predicted: Mapping[ExpertKey, Prediction],
                       accuracy: ForecastAccuracy | None) -> dict[ExpertKey, Prediction]:
    """Each prediction with prob = 1 - prod over its votes of (1 - q), q the measured precision
    of one vote of its grade at its distance (of its distance alone for an ungraded forecast;
    1 without `accuracy`): the batch uses a key if any one of its votes is right, so votes raise
    the chance (at batch 1, one vote: prob = q). Pure given the accuracy's counts."""
    prec: dict[int, float] = {}
    graded: dict[tuple[int, int], tuple[float, ...]] = {}
    out = {}
    for key, p in predicted.items():
        d = p.distance
        if accuracy is None:
            prob = 1.0
        elif p.grades:
            cell = (key[0], d)
            if cell not in graded:
                graded[cell] = accuracy.graded_precision(d, key[0])
            miss = 1.0
            for q, n in zip(graded[cell], p.grades):
                if n:
                    miss *= (1.0 - q) ** n
            prob = 1.0 - miss
        else:
            if d not in prec:
                prec[d] = accuracy.precision(d)
            prob = 1.0 - (1.0 - prec[d]) ** max(p.score, 0.0)
        out[key] = Prediction(d, p.score, prob, p.grades)
    return out
