"""What the cache prefetches from, and whether it predicts now.

Prediction owns the Prefetcher (the latest forecast, prefetcher.py), the forecaster that feeds it
(the owner given to ExpertCache.start_prefetch, e.g. the hub's OnlinePredictor: its stats are
reported with the cache's and it is stopped on close) and, with prefetch_switch measured, the
PrefetchSwitch that keeps prediction on only while it pays (prefetch_switch.py). While the switch
is off the forecaster is paused and the cache is LRU: no forecast ranks victims and nothing is
prefetched.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from expert_cache.config import CacheConfig
from expert_cache.loads_budget import LoadsBudget
from expert_cache.policies import Position
from expert_cache.prefetch_switch import PrefetchSwitch, ShadowLRU
from expert_cache.prefetcher import Prefetcher
from expert_cache.state import CacheState
from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.events import Forecast


class Prediction:
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.prefetcher: Prefetcher | None = None
        self.source = None  # what feeds the prefetcher (OnlinePredictor), stopped on close
        # prefetch_switch measured: prediction on only while it pays (prefetch_switch.py)
        self.switch: PrefetchSwitch | None = None
        # the shadow LRU's loads on the same accesses: the prefetch loads budget and the switch's
        # comparison (None when neither is on)
        self.budget: LoadsBudget | None = None
        self._spent_seen = 0.0  # the source's host seconds already handed to the switch
        self._feed_s = 0.0  # host seconds in feed() (forecasts fed) since the last spent()

    def start(self, cfg: CacheConfig, state: CacheState, *, depth: int | str, max_depth: int,
              owner) -> Prefetcher:
        """Prefetch from the forecasts fed here; `owner` makes them (see the module docstring)."""
        if self.prefetcher is not None:
            raise MoeRtError("the expert cache already has a prefetcher")
        self.prefetcher = Prefetcher(self.num_layers, depth, max_depth, cfg.prefetch_queue)
        self.source = owner
        if cfg.prefetch_loads_budget or cfg.prefetch_switch == "measured":
            self.budget = LoadsBudget(ShadowLRU.of(state), cfg.prefetch_loads_budget, cfg.prefetch_queue)
        if cfg.prefetch_switch == "measured":
            # a window of 8 steps at batch 1: enough visits that one slow read does not decide
            self.switch = PrefetchSwitch(8 * self.num_layers)
            if not self.switch.on and owner is not None and hasattr(owner, "pause"):
                owner.pause()  # the first window measures the baseline, prediction off
        return self.prefetcher

    @property
    def predicting(self) -> bool:
        """A prefetcher is started and the switch (if any) has prediction on."""
        return self.prefetcher is not None and (self.switch is None or self.switch.on)

    def turn(self, on: bool) -> None:
        """The switch turned prediction on or off: pause or resume the forecaster (off, the
        cache is LRU: no forecast ranks victims and nothing is prefetched)."""
        self.prefetcher.pause()
        source = self.source
        if source is not None and hasattr(source, "pause"):
            source.resume() if on else source.pause()

    def spent(self) -> float:
        """Host seconds the forecaster and forecast feeding took since the last call."""
        spent, self._feed_s = self._feed_s, 0.0
        total = getattr(self.source, "spent_s", None)
        if total is not None:
            spent += total - self._spent_seen
            self._spent_seen = total
        return spent

    def feed(self, forecasts: Sequence[Forecast]) -> None:
        """Replace the prefetcher's forecast with `forecasts` while predicting (timed: the
        switch weighs it as host cost)."""
        if self.predicting and forecasts:
            t0 = time.perf_counter()
            for forecast in forecasts:
                self.prefetcher.feed(forecast)
            self._feed_s += time.perf_counter() - t0

    def forecast(self, l: int, now: int, state: CacheState):
        """The forecast in force with probabilities, and where it was made (ranks demand victims
        under policy predictive, and decides prefetches); (None, None) without prefetch."""
        p = self.prefetcher
        if p is None:
            return None, None
        return p.probabilities(), Position(l, self.num_layers, p.depth, now, state.reuse_probabilities())

    def stop(self) -> None:
        """Stop the forecaster (close)."""
        if self.source is not None and hasattr(self.source, "stop"):
            self.source.stop()
