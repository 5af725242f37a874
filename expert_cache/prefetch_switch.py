"""When prediction pays: an adaptive on/off switch for forecasting and prefetch, from measurements.

The cost rule (cost_model.prefetch_gain) weighs disk time against layer time per prefetch; it
cannot see what the machinery costs the host: running the predictor after every layer, turning its
votes into probabilities, planning and issuing prefetches, reaping tickets, and a transfer thread
taking the GIL and a core from the compute. On a GPU most of that overlaps the device; on a
CPU-only machine it runs on the cores the model computes on, and on the demo model it costs more
than the reads it saves. So the cache measures both sides per window of layer visits:

  benefit = lru_loads x read_s - stall_s
      what the same visits would have stalled under plain LRU (a shadow LRU run on the same
      accesses counts its loads; each costs a demand read measured with no prefetch in flight)
      minus the stall measured (demand loads, waits for landing prefetches, streamed misses);
  cost    = inside_s + max(outside_extra_s, forecaster_s)
      inside_s: host seconds of the machinery inside prepare (forecast bookkeeping, reaping,
      prefetch planning and issue), timed directly; outside_extra_s: how much longer the time
      between consecutive prepares of a forward (the layer's compute, the next attention and
      router, the predictor) was than with prediction off, per visit of the same batch size
      (measured in the off windows); forecaster_s: the predictor's own timed seconds, a floor
      for that extra when the off baseline is noisy.

`next_switch` (pure) turns windows into on/off with hysteresis: prediction stays on while
benefit >= cost and its loads stay within max_bytes x the shadow LRU's; when off, the predictor is
paused and the cache behaves as LRU (no forecast: the predictive victim order is LRU's, nothing is
prefetched). It starts off for one window (the baseline), then probes. A probe must clear the
higher bar benefit >= (1 + margin) x cost to stay on; a failed probe doubles the backoff (windows
off before the next probe, up to max_backoff), so where prediction never pays about
1/(backoff+1) of the time goes to probing.

Shape legend: none (counts and seconds).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable

from expert_cache.policies import ExpertKey

if TYPE_CHECKING:
    from expert_cache.state import CacheState


@dataclass(frozen=True)
class Window:
    """What one window of layer visits with prediction on measured."""

    cost_s: float  # host seconds the prediction/prefetch machinery cost (module docstring)
    stall_s: float  # measured stall (demand reads, waits for prefetches, streamed misses)
    lru_loads: int  # loads a plain LRU cache of the same capacity made on the same accesses
    loads: int  # loads this cache made: demand loads plus prefetches issued
    read_s: float  # seconds per demand read with no prefetch in flight

    @property
    def benefit_s(self) -> float:
        return self.lru_loads * self.read_s - self.stall_s


@dataclass(frozen=True)
class SwitchState:
    on: bool = False  # starts off: the first window measures the baseline the probes are held to
    probe: bool = False  # this on-window is a probe after a spell off (must clear the margin)
    off_windows: int = 0  # windows spent off since switching off
    backoff: int = 1  # windows off before the next probe
    changes: int = 0  # on/off transitions so far (reporting)


def next_switch(state: SwitchState, window: Window | None, *, margin: float = 0.1,
                max_bytes: float = 1.1, min_backoff: int = 4, max_backoff: int = 64) -> SwitchState:
    """The switch after one more window. `window` is what it measured when on (ignored when off).
    On: stays on iff benefit >= cost (x (1 + margin) for a probe) and loads <= max_bytes x the
    shadow LRU's; else off, with the backoff reset after a spell on or doubled after a failed
    probe. Off: counts the window, and turns on as a probe once `backoff` windows have passed."""
    if not state.on:
        off = state.off_windows + 1
        if off >= state.backoff:
            return replace(state, on=True, probe=True, off_windows=0, changes=state.changes + 1)
        return replace(state, off_windows=off)
    if window is None:
        return state
    bar = window.cost_s * ((1.0 + margin) if state.probe else 1.0)
    pays = window.benefit_s >= bar and window.loads <= max_bytes * window.lru_loads
    if pays:
        return replace(state, probe=False, backoff=min_backoff)
    backoff = min(max(2 * state.backoff, min_backoff), max_backoff) if state.probe else min_backoff
    return SwitchState(on=False, probe=False, off_windows=0, backoff=backoff, changes=state.changes + 1)


class ShadowLRU:
    """Which accesses a plain LRU cache would miss: one recency order per pool, the pool's
    capacity as `capacity_of` says (pinned keys are always resident there and never counted).
    Stands in for the LRU run the switch compares against, on the same accesses."""

    def __init__(self, pool_of: Callable[[ExpertKey], int], capacity_of: Callable[[int], int],
                 pinned: Iterable[ExpertKey] = ()) -> None:
        self.pool_of, self.capacity_of = pool_of, capacity_of
        self.pinned = set(pinned)
        self.pools: dict[int, OrderedDict[ExpertKey, None]] = {}

    @classmethod
    def of(cls, state: "CacheState") -> "ShadowLRU":
        """The LRU twin of a CacheState's pools: each pool's slots less its pinned keys."""
        room = {pool: state.capacity(pool) - sum(state.pool_of(k) == pool for k in state.pinned_keys)
                for pool in state.pool_keys}
        return cls(state.pool_of, room.__getitem__, state.pinned_keys)

    def visit(self, keys: Iterable[ExpertKey]) -> int:
        """Access `keys` (one layer visit); returns how many LRU would have loaded. As in the
        cache, a visit's keys are never each other's victims (a miss with no other victim is
        streamed: loaded, not kept), and they share one tick, so ties go by key (lru_key)."""
        visit = [k for k in dict.fromkeys(keys) if k not in self.pinned]
        mine, loads = set(visit), 0
        for key in visit:
            pool = self.pool_of(key)
            order = self.pools.get(pool)
            if order is None:
                order = self.pools[pool] = OrderedDict()
            if key in order:
                continue
            loads += 1
            if len(order) >= self.capacity_of(pool):
                victim = next((k for k in order if k not in mine), None)
                if victim is None:
                    continue
                del order[victim]
            order[key] = None
        for key in sorted(visit):
            order = self.pools[self.pool_of(key)]
            if key in order:
                order.move_to_end(key)
        return loads


class PrefetchSwitch:
    """The cache's side of the switch: sums one window of measurements, counts the shadow LRU's
    loads on every visit (the shadow runs on every visit, so it is warm when a probe starts),
    keeps the off baseline of the time between prepares per batch size, and at a step boundary
    once `window_visits` visits have passed applies next_switch. The cache pauses and resumes the
    predictor on `on` changes. The shadow LRU is fed by the cache's loads budget
    (loads_budget.LoadsBudget, one shadow for both), which hands each visit's LRU loads to
    `visit`."""

    def __init__(self, window_visits: int) -> None:
        self.window_visits = max(1, window_visits)
        self.state = SwitchState()
        self.read_s: float | None = None  # moving average, demand reads with no prefetch in flight
        self._busy_read_s: float | None = None  # the same over every demand read (until a quiet one)
        self.base_s: dict[int, float] = {}  # rows -> time between prepares with prediction off
        self.visits_on = self.visits = 0
        self.windows: list[Window] = []  # every measured window (reporting)
        self._reset()

    def _reset(self) -> None:
        self._visits = self._lru = self._loads = 0
        self._inside = self._outside = self._forecaster = self._stall = 0.0

    @property
    def on(self) -> bool:
        return self.state.on

    def visit(self, lru: int) -> None:
        """One layer visit, on which a plain LRU cache made `lru` loads."""
        self.visits += 1
        self._visits += 1
        if self.state.on:
            self.visits_on += 1
            self._lru += lru

    def between(self, rows: int, seconds: float) -> None:
        """The time from one prepare's end to the next prepare of the same forward, `rows` tokens."""
        if not self.state.on:
            self.base_s[rows] = _ema(self.base_s.get(rows), seconds)
        elif rows in self.base_s:
            self._outside += seconds - self.base_s[rows]

    def add(self, *, inside_s: float = 0.0, forecaster_s: float = 0.0, stall_s: float = 0.0,
            loads: int = 0) -> None:
        if self.state.on:
            self._inside += inside_s
            self._forecaster += forecaster_s
            self._stall += stall_s
            self._loads += loads

    def record_read(self, seconds: float, quiet: bool) -> None:
        """One demand read; `quiet`: no prefetch was in flight. Quiet reads are what one LRU load
        costs here (a prefetch sharing the disk slows the read beside it); until one is seen,
        every read stands in."""
        if quiet:
            self.read_s = _ema(self.read_s, seconds)
        else:
            self._busy_read_s = _ema(self._busy_read_s, seconds)

    def step_boundary(self) -> bool:
        """Call where a forward starts; returns True when `on` changed."""
        before = self.state.on
        read_s = self.read_s if self.read_s is not None else self._busy_read_s
        if self._visits < self.window_visits or (before and read_s is None):
            return False
        if before:
            cost = self._inside + max(self._outside, self._forecaster)
            window = Window(cost, self._stall, self._lru, self._loads, read_s)
            self.windows.append(window)
            self.state = next_switch(self.state, window)
        else:
            self.state = next_switch(self.state, None)
        self._reset()
        return self.state.on != before

    def stats(self) -> dict:
        w = self.windows
        return {"prefetch_switch_on": self.state.on, "prefetch_switch_changes": self.state.changes,
                "prefetch_on_fraction": self.visits_on / self.visits if self.visits else None,
                "prefetch_on_visits": self.visits_on, "switch_visits": self.visits,
                "switch_windows": len(w),
                "switch_benefit_ms": sum(x.benefit_s for x in w) * 1e3,
                "switch_cost_ms": sum(x.cost_s for x in w) * 1e3}


def _ema(old: float | None, x: float, alpha: float = 0.1) -> float:
    return x if old is None else (1 - alpha) * old + alpha * x
