"""The prefetcher's decisions: which forecast experts to load early, and how far ahead to look.

The model hands the cache each layer's Forecasts (moe_rt.layers.moe.events: made by the hub's
forecaster after layer l routes, given to ExpertStore.prefetch before prepare(l)); `feed` keeps
the latest as per-key Predictions, exactly like the replay simulator's (forecast.predictions:
score = tokens voting for the expert). It moves no bytes and changes no residency: the cache
(cache.ExpertCache) asks it for `candidates` after each layer's demand loads and issues them
through the transfer engine, evicting only what policies.should_displace allows.

`lookahead: auto` picks the depth online: prefetches issued after layer l have d layer-times to
land before layer l+d runs, and one worker copies them one after another, so the smallest depth
that hides one layer's expected loads (demand misses plus prefetches) is ceil(loads per layer x
read time per expert / layer time) (cost_model.lookahead_depth), all measured as exponential
moving averages while the model runs.

It also measures what the bandwidth-aware rule needs (cost_model.prefetch_gain): the read time
of every copy (prefetches and demand loads alike) and the forecaster's precision
(forecast.ForecastAccuracy), which turns votes into probabilities (`probabilities`).

Shape legend: E experts per layer.
"""
from __future__ import annotations

from expert_cache.cost_model import PrefetchCosts, lookahead_depth
from expert_cache.forecast import ForecastAccuracy, predictions, prefetch_order, with_probabilities
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
        self.loads_per_layer = MovingAverage()  # demand loads + prefetches per layer
        self.accuracy = ForecastAccuracy()

    def feed(self, forecast: Forecast) -> None:
        """One forecast made after layer target-distance. Distance 1 opens a new round: the
        forecast after a layer replaces the previous one (as in replay)."""
        if forecast.distance == 1:
            self.predicted = {}
        if forecast.distance > self.depth or not 0 <= forecast.target < self.num_layers:
            return
        new = predictions(forecast)
        self.accuracy.record(new)
        self.predicted.update(new)

    def pause(self) -> None:
        """Prediction switched off or back on: drop the forecast in force and the votes still
        waiting to be scored (the layers they were for may run unforecast)."""
        self.predicted = {}
        self.accuracy.drop_pending()

    # -- decisions ----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        if not self.auto:
            return self._fixed
        n = self.loads_per_layer.value
        return lookahead_depth(n, self.transfer_s.value, self.layer_s.value, self.max_depth)

    def probabilities(self) -> dict[ExpertKey, Prediction]:
        """The forecast in force with each key's probability (forecast.with_probabilities)."""
        return with_probabilities(self.predicted, self.accuracy)

    def costs(self, queued: int, victim_reuse: float, demand_per_layer: float) -> PrefetchCosts:
        """What the cost rule weighs: the read and layer times measured here, with the cache's
        `queued` reads, measured victim reuse and demand reads per visit. Before any read or
        layer is timed, the two count as equal."""
        read_s, layer_s = self.transfer_s.value, self.layer_s.value
        if read_s is None or layer_s is None:
            read_s = layer_s = 1.0
        return PrefetchCosts(read_s, layer_s, queued, victim_reuse, demand_per_layer)

    def observe(self, layer: int, used) -> None:
        """Layer `layer` is about to run with `used`: scores the forecasts made for it."""
        self.accuracy.observe(layer, used)

    def candidates(self, resident) -> list[ExpertKey]:
        """Forecast keys not resident, nearest layer then highest score first (all of them: the
        cache stops at `limit` issued, skipping keys it may not make room for)."""
        return prefetch_order(self.predicted, resident, len(self.predicted))

    # -- measurements -------------------------------------------------------------------------
    def record_transfer(self, seconds: float) -> None:
        self.transfer_s.add(seconds)

    def record_layer(self, seconds: float, issued: int, misses: int = 0) -> None:
        self.layer_s.add(seconds)
        self.issued_per_layer.add(issued)
        self.loads_per_layer.add(issued + misses)
