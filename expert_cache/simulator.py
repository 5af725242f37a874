"""Replay a routing trace through the expert cache and count hits, misses and prefetches.

Replay model (docs/expert-cache.md states it for users):
- Rows with the same `steps` value are one forward batch (schedule_replay.py regroups a trace's
  rows into the steps a scheduling policy would take). A step visits MoE layers 0..L-1 in
  order; one visit is one tick (tick = step_ordinal * L + layer).
- A visit accesses each distinct expert the batch's tokens chose at that layer once (the union).
  The needed keys are protected while the layer runs. A miss evicts one candidate chosen by the
  policy and takes its slot; with no candidate it is streamed (loaded to staging, not kept).
- Policy "predictive": the forecast made from layer l's routing, for layers l+1..l+d (predictor
  scores aggregated by votes, see forecast.py), replaces the previous one when layer l routes,
  as in the engine (the router runs before the layer's experts are prepared). It ranks layer
  l's victims, and after l's demand loads up to `prefetch_queue` forecast keys are prefetched.
  Loads complete before the next layer runs, so hit rates are an upper bound on what the engine
  sees when transfers are slower than layers.
- Demand and prefetch decisions are planning.plan_demand / plan_prefetch applied by CacheState,
  exactly the calls the in-engine cache (cache.ExpertCache) makes, so replay and runtime agree
  (tests/expert_cache/test_ec_replay_matches_runtime.py).
- Policy "belady": demand paging with perfect knowledge of future accesses, no prefetch. A
  visit's misses are all loaded (to slots or staging); afterwards each pool keeps the
  `capacity` keys, among its old residents and the new loads, whose next use is soonest
  (Belady's furthest-next-use eviction with bypass, for set requests). Every demand policy ends
  a visit with one such subset, so Belady needs the fewest loads: for every policy, prefetching
  or not, loads >= Belady's misses, and without prefetch hit rate <= Belady's. Prefetching can
  beat Belady's hit rate by loading early; it cannot beat its loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from expert_cache.cost_model import PrefetchCosts, bytes_only_costs
from expert_cache.forecast import ForecastAccuracy, aggregate_scores, prefetch_order, with_probabilities
from expert_cache.link_clock import LinkClock
from expert_cache.loads_budget import LoadsBudget
from expert_cache.planning import plan_demand, plan_keep, plan_prefetch
from expert_cache.prefetch_switch import ShadowLRU
from expert_cache.policies import NEVER, ExpertKey, Position, Prediction
from expert_cache.state import CacheState, CacheStats, Scope
from moe_rt.errors import MoeRtError
from router_predict.trace import Trace, step_bounds

SIM_POLICIES = ("lru", "lfu", "predictive", "belady")


@dataclass(frozen=True)
class BatchNeeds:
    """needs[s][l]: sorted distinct experts the batch of step ordinal s uses at MoE layer l."""

    num_layers: int  # L
    num_experts: int  # E
    needs: tuple[tuple[tuple[int, ...], ...], ...]  # [S][L] expert ids

    @property
    def num_steps(self) -> int:
        return len(self.needs)

    @classmethod
    def from_trace(cls, trace: Trace) -> "BatchNeeds":
        rows = []
        for _, a, b in step_bounds(trace.steps):
            ids = trace.topk_ids[a:b]  # [T, L, k]
            # -1: a choice dynamic top-k dropped, no expert used
            rows.append(tuple(tuple(int(e) for e in np.unique(ids[:, l, :]) if e >= 0)
                              for l in range(trace.num_layers)))
        return cls(trace.num_layers, trace.num_experts, tuple(rows))


@dataclass(frozen=True)
class ForecastSchedule:
    """forecasts[s][l]: what the predictor forecast right after layer l of step ordinal s.

    Forecasts do not depend on cache state, so one schedule serves every policy and capacity."""

    depth: int
    forecasts: tuple[tuple[dict[ExpertKey, Prediction], ...], ...]  # [S][L]


def predict_schedule(trace: Trace, predictor, depth: int, progress: bool = True) -> ForecastSchedule:
    """Run `predictor` (router_predict.base.Predictor) after every layer of every step."""
    import torch

    from router_predict.base import LayerObservation

    if depth < 1:
        raise MoeRtError(f"look-ahead depth must be >= 1, got {depth}")
    if getattr(predictor, "needs_hidden", False) and trace.hidden is None:
        raise MoeRtError(f"predictor {predictor.name} needs router inputs, but the trace has no "
                         f"`hidden` array; use an id-only predictor (frequency, coactivation)")
    if getattr(predictor, "needs_layer_output", False) and trace.layer_output is None:
        raise MoeRtError(f"predictor {predictor.name} needs layer outputs, but the trace has no "
                         f"`layer_output` array (record it with moe-rt trace --with-layer-output)")
    num_layers, num_experts = trace.num_layers, trace.num_experts
    out = []
    bounds = step_bounds(trace.steps)
    for _, a, b in tqdm(bounds, desc="predict", unit="step", disable=not progress):
        per_layer = []
        for l in range(num_layers):
            d = min(depth, num_layers - 1 - l)
            if d == 0:
                per_layer.append({})
                continue
            hidden = None if trace.hidden is None else torch.from_numpy(trace.hidden[a:b, l]).float()
            output = None if trace.layer_output is None else torch.from_numpy(trace.layer_output[a:b, l]).float()
            obs = LayerObservation(
                moe_index=l, topk_ids=torch.from_numpy(trace.topk_ids[a:b, l]).long(),
                topk_weights=torch.from_numpy(trace.topk_weights[a:b, l]), hidden=hidden,
                token_ids=None if trace.token_ids is None else torch.from_numpy(trace.token_ids[a:b]),
                positions=torch.from_numpy(trace.positions[a:b]), layer_output=output)
            with torch.no_grad():
                scores = predictor.predict(obs, depth)
            if tuple(scores.shape) != (d, b - a, num_experts):
                raise MoeRtError(f"predictor {predictor.name} returned scores of shape "
                                 f"{tuple(scores.shape)} at layer {l}, "
                                 f"expected {(d, b - a, num_experts)}")
            per_layer.append(aggregate_scores(scores, trace.top_k, l + 1))
        out.append(tuple(per_layer))
    return ForecastSchedule(depth, tuple(out))


def oracle_schedule(trace: Trace, depth: int) -> ForecastSchedule:
    """A perfect predictor: the forecast after layer l is exactly what layers l+1..l+d use in
    this step, scored like `aggregate_scores` (tokens choosing the expert). The reference for
    how good prediction-aware caching can get."""
    if depth < 1:
        raise MoeRtError(f"look-ahead depth must be >= 1, got {depth}")
    num_layers = trace.num_layers
    out = []
    for _, a, b in step_bounds(trace.steps):
        votes = []
        for m in range(num_layers):
            experts, counts = np.unique(trace.topk_ids[a:b, m, :], return_counts=True)
            votes.append(list(zip(experts.tolist(), counts.tolist())))
        per_layer = []
        for l in range(num_layers):
            f = {}
            for m in range(l + 1, min(l + depth, num_layers - 1) + 1):
                f.update({(m, e): Prediction(m - l, float(c)) for e, c in votes[m]})
            per_layer.append(f)
        out.append(tuple(per_layer))
    return ForecastSchedule(depth, tuple(out))


@dataclass(frozen=True)
class SimOptions:
    policy: str  # lru | lfu | predictive | belady
    capacity_slots: int  # slots per pool: per layer (per_layer) or in total (global)
    scope: Scope = "per_layer"
    prefetch_queue: int = 8  # most prefetches after one layer (predictive only)
    pinned: tuple[ExpertKey, ...] = ()
    expert_bytes: int = 0  # for byte counters; 0 leaves them at 0
    # Link and layer times (read_s, layer_s; queued and victim_reuse are filled in as replay
    # goes): prefetch by the runtime's cost rule (prefetch_rule: cost) and model the stall time
    # on a LinkClock. None: no time is modelled; the cost rule then weighs bytes alone
    # (cost_model.bytes_only_costs: every prefetch lands in time, a wasted one costs a read).
    costs: PrefetchCosts | None = None
    # cost: prefetch only where cost_model.prefetch_gain is positive (the runtime's default);
    # always: every forecast key that may displace its victim (prefetch_rule: always).
    prefetch_rule: str = "cost"
    # predictive: most loads as a multiple of a shadow LRU's on the same accesses; a prefetch
    # beyond it is refused (loads_budget.py, the runtime's prefetch_loads_budget). None/0: none.
    prefetch_loads_budget: float | None = 1.1


@dataclass
class SimulationResult:
    options: SimOptions
    depth: int | None  # look-ahead of the forecast schedule (predictive), else None
    stats: CacheStats = field(default_factory=CacheStats)
    modelled_s: float | None = None  # LinkClock time of the whole replay (with options.costs)
    modelled_reads: int | None = None  # reads that moved bytes on the clock (cancels excluded)
    budget: dict | None = None  # LoadsBudget.stats() (predictive with a loads budget)

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate

    def as_dict(self) -> dict:
        o = self.options
        return {"policy": o.policy, "scope": o.scope, "capacity_slots": o.capacity_slots,
                "depth": self.depth, **self.stats.as_dict(),
                **({} if self.modelled_s is None else {"modelled_s": self.modelled_s,
                                                       "modelled_reads": self.modelled_reads}),
                **(self.budget or {})}


def _next_use_table(needs: BatchNeeds) -> dict[ExpertKey, list[int]]:
    """Ticks at which each key is accessed, in reverse order so the next one is a cheap pop()."""
    ticks: dict[ExpertKey, list[int]] = {}
    L = needs.num_layers
    for s, step in enumerate(needs.needs):
        for l, experts in enumerate(step):
            for e in experts:
                ticks.setdefault((l, e), []).append(s * L + l)
    for v in ticks.values():
        v.reverse()
    return ticks


def simulate(needs: BatchNeeds, options: SimOptions,
             schedule: ForecastSchedule | None = None) -> SimulationResult:
    """Replay `needs` under `options`; `schedule` is required for policy predictive."""
    policy = options.policy
    if policy not in SIM_POLICIES:
        raise MoeRtError(f"unknown policy {policy!r}; choose from {', '.join(SIM_POLICIES)}")
    if policy == "predictive" and schedule is None:
        raise MoeRtError("policy predictive needs a predictor (--predictor)")
    if options.capacity_slots < 1:
        raise MoeRtError(f"capacity must be >= 1 slot, got {options.capacity_slots}")
    if schedule is not None and len(schedule.forecasts) != needs.num_steps:
        raise MoeRtError(f"forecast schedule has {len(schedule.forecasts)} steps, trace has "
                         f"{needs.num_steps}")
    state = CacheState(needs.num_layers, options.capacity_slots, options.scope, options.expert_bytes)
    for key in options.pinned:
        if not state.can_pin(key):
            raise MoeRtError(f"cannot pin {key}: more pinned experts than capacity "
                             f"{options.capacity_slots} in its pool")
        state.pin(key, now=-1)
    L = needs.num_layers
    clock = budget = None
    if policy == "belady":
        _replay_belady(needs, state)
    else:
        accuracy = ForecastAccuracy()
        clock = None if options.costs is None else LinkClock(options.costs.read_s, options.costs.layer_s)
        if policy == "predictive" and options.prefetch_loads_budget:
            budget = LoadsBudget(ShadowLRU.of(state), options.prefetch_loads_budget,
                                 options.prefetch_queue)
        for s, step in enumerate(needs.needs):
            for l, experts in enumerate(step):
                keys = [(l, e) for e in experts]
                predicted, position = {}, None
                if policy == "predictive":
                    # In the runtime's order: the forecast made after l is fed (recorded), l's
                    # keys score the forecasts made for l, then votes become probabilities.
                    accuracy.record(schedule.forecasts[s][l])
                    accuracy.observe(l, keys)
                    predicted = with_probabilities(schedule.forecasts[s][l], accuracy)
                    position = Position(l, L, schedule.depth, s * L + l,
                                        state.reuse_probabilities())
                costs = options.costs
                if costs is None and options.prefetch_rule == "cost":
                    costs = bytes_only_costs()
                elif options.prefetch_rule == "always":
                    costs = None
                _visit(state, keys, s * L + l, policy, predicted,
                       options.prefetch_queue if policy == "predictive" else 0, position,
                       costs, clock, budget)
    result = SimulationResult(options, schedule.depth if policy == "predictive" else None, state.stats)
    if budget is not None:
        result.budget = budget.stats()
    if clock is not None:
        state.stats.stall_s = clock.stall_s
        result.modelled_s = clock.now
        result.modelled_reads = clock.reads
    return result


def _visit(state: CacheState, keys: list[ExpertKey], tick: int, policy: str,
           predicted: dict[ExpertKey, Prediction], prefetch_queue: int,
           position: Position | None = None, costs: PrefetchCosts | None = None,
           clock: LinkClock | None = None, budget: LoadsBudget | None = None) -> None:
    """One layer visit under a demand policy, in the engine's order (cache.ExpertCache.prepare):
    the layer's keys become needed, its demand plan is applied, then the forecast's prefetches
    (issued while the layer computes, so its keys stay protected). With `costs` the prefetches
    follow the cost rule, with the queue and victim reuse as `clock` and the state see them; with
    `budget` no more than its loads budget allows (the shadow LRU sees the visit first)."""
    if budget is not None:
        budget.visit(keys)
    state.clear_needed()
    state.mark_needed(keys)
    demand = plan_demand(state, keys, policy, predicted, position=position)
    state.apply_demand(demand, tick)
    if clock is not None:
        clock.begin_layer(keys[0][0] if keys else 0, keys, len(demand.loads) + len(demand.streamed),
                          predicted)
    if costs is not None:
        # per visit so far (ticks count visits); none on an idle link (bytes-only costs)
        demand = state.stats.misses / max(tick + 1, 1) if clock is not None else 0.0
        costs = PrefetchCosts(costs.read_s, costs.layer_s, 0 if clock is None else clock.queued(),
                              state.victim_reuse(), demand)
    candidates = prefetch_order(predicted, state.entries, len(predicted))
    limit = prefetch_queue if budget is None else budget.limit(state.stats.loads, prefetch_queue)
    plan = plan_prefetch(state, candidates, predicted, limit, position, costs)
    state.apply_prefetch(plan, tick, in_flight=False)  # replay's copies land at once
    if clock is not None:
        clock.issue(load.key for load in plan.loads)
        clock.end_layer()
    state.clear_needed()


def _replay_belady(needs: BatchNeeds, state: CacheState) -> None:
    """Belady: every miss of a visit is loaded (to a slot or staging); after the visit each pool
    keeps the soonest-used set of old residents and new loads (planning.plan_keep)."""
    future = _next_use_table(needs)
    next_use = {k: float(v[-1]) for k, v in future.items()}
    L = needs.num_layers
    for s, step in enumerate(needs.needs):
        for l, experts in enumerate(step):
            tick = s * L + l
            keys = [(l, e) for e in experts]
            missed = [k for k in keys if state.access(k, tick) == "miss"]
            for k in keys:  # move each accessed key's next use past this tick
                future[k].pop()
                next_use[k] = float(future[k][-1]) if future[k] else NEVER
            state.apply_keep(plan_keep(state, missed, next_use), tick)


@dataclass(frozen=True)
class HitRateCurve:
    """Results per policy over capacities given in slots per layer (global pool = that x L)."""

    scope: Scope
    capacities: tuple[int, ...]
    results: dict[str, tuple[SimulationResult, ...]]

    def hit_rates(self, policy: str) -> list[float]:
        return [r.hit_rate for r in self.results[policy]]


def pool_slots(slots_per_layer: int, scope: Scope, num_layers: int) -> int:
    """Pool size for a capacity stated per layer: a global pool gets the same total."""
    return slots_per_layer if scope == "per_layer" else slots_per_layer * num_layers


def hit_rate_curve(trace: Trace | BatchNeeds, capacities: Sequence[int], policies: Iterable[str],
                   *, scope: Scope = "per_layer", schedule: ForecastSchedule | None = None,
                   prefetch_queue: int = 8, progress: bool = True) -> HitRateCurve:
    """Simulate every policy at every capacity (slots per layer); Belady is always included."""
    needs = trace if isinstance(trace, BatchNeeds) else BatchNeeds.from_trace(trace)
    names = list(dict.fromkeys([*policies, "belady"]))
    runs = [(p, c) for p in names for c in capacities]
    results: dict[str, list[SimulationResult]] = {p: [] for p in names}
    for p, c in tqdm(runs, desc="simulate", unit="run", disable=not progress):
        opts = SimOptions(p, pool_slots(c, scope, needs.num_layers), scope, prefetch_queue)
        results[p].append(simulate(needs, opts, schedule if p == "predictive" else None))
    return HitRateCurve(scope, tuple(capacities), {p: tuple(r) for p, r in results.items()})
