"""The prefetcher's decisions: which forecast experts to load early, and how far ahead to look.

The model hands the cache each layer's Forecasts (moe_rt.layers.moe.events: made by the hub's
forecaster after layer l routes, given to ExpertStore.prefetch before prepare(l)); `feed` keeps
the latest as per-key Predictions, exactly like the replay simulator's (forecast.predictions:
score = tokens voting for the expert). It moves no bytes and changes no residency: the cache
(cache.ExpertCache) asks it for `candidates` after each layer's demand loads and issues them
through the transfer engine, evicting only what policies.should_displace allows.

`lookahead: auto` picks the depth online: prefetches issued after layer l have d layer-times to
land before layer l+d runs, and one worker copies them one after another, so the smallest depth
that hides them is ceil(prefetches per layer x transfer time per expert / layer time), all three
measured as exponential moving averages while the model runs.

Shape legend: E experts per layer.
"""
from __future__ import annotations

import math

from expert_cache.forecast import predictions, prefetch_order
from expert_cache.policies import ExpertKey, Prediction
from moe_rt.layers.moe.events import Forecast


class MovingAverage:
    """Exponential moving average; None until the first sample."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


class Prefetcher:
    def __init__(self, num_layers: int, depth: int | str, max_depth: int, limit: int) -> None:
        """depth: an int >= 1 or "auto"; max_depth: the deepest forecast the source makes;
        limit: most prefetches issued after one layer (prefetch_queue)."""
        self.num_layers, self.limit = num_layers, limit
        self.auto = depth == "auto"
        self.max_depth = max(1, max_depth)
        self._fixed = 1 if self.auto else min(int(depth), self.max_depth)
        self.predicted: dict[ExpertKey, Prediction] = {}  # the latest forecast, within depth
        self.transfer_s = MovingAverage()  # seconds per expert copy (worker)
        self.layer_s = MovingAverage()  # seconds per MoE layer (compute, stalls excluded)
        self.issued_per_layer = MovingAverage()

    def feed(self, forecast: Forecast) -> None:
        """One forecast made after layer target-distance. Distance 1 opens a new round: the
        forecast after a layer replaces the previous one (as in replay)."""
        if forecast.distance == 1:
            self.predicted = {}
        if forecast.distance > self.depth or not 0 <= forecast.target < self.num_layers:
            return
        self.predicted.update(predictions(forecast))

    # -- decisions ----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        if not self.auto:
            return self._fixed
        t_x, t_l, n = self.transfer_s.value, self.layer_s.value, self.issued_per_layer.value
        if t_x is None or not t_l or not n:
            return 1
        return max(1, min(self.max_depth, math.ceil(n * t_x / t_l)))

    def candidates(self, resident) -> list[ExpertKey]:
        """Forecast keys not resident, nearest layer then highest score first (all of them: the
        cache stops at `limit` issued, skipping keys it may not make room for)."""
        return prefetch_order(self.predicted, resident, len(self.predicted))

    # -- measurements -------------------------------------------------------------------------
    def record_transfer(self, seconds: float) -> None:
        self.transfer_s.add(seconds)

    def record_layer(self, seconds: float, issued: int) -> None:
        self.layer_s.add(seconds)
        self.issued_per_layer.add(issued)
