"""Pure planners: what a layer visit loads, what a forecast prefetches, and what each evicts.

The in-engine cache (cache.ExpertCache) and the replay simulator (simulator.py) both decide with
these functions and apply the result with CacheState's transitions (`apply_demand`,
`apply_prefetch`, `apply_keep`), so replay cannot drift from what the runtime does: the same
state, forecast and keys give the same hits, misses, slots and victims.

A planner reads a CacheState and changes nothing. Demand and prefetch plans name every slot they
use, as CacheState would hand them out (a victim's slot goes to the key that evicts it; otherwise the pool's free
slots in order), and CacheState refuses to apply a plan whose slots no longer match: a stale plan
is a bug, not a different outcome. (Belady's KeepPlan, offline only, leaves slots to `admit`.)

Never-evict rules (glossary in docs/expert-cache.md): victims come only from
`CacheState.candidates`, i.e. never pinned, in flight or needed; on top of that a plan never
evicts a key of the visit it plans, nor a victim or key it already chose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from expert_cache.cost_model import PrefetchCosts, prefetch_gain
from expert_cache.policies import (ExpertKey, PolicyInputs, Position, Prediction, belady_keep, choose_victims,
                                   reuse_chance, should_displace)

if TYPE_CHECKING:
    from expert_cache.state import CacheState


@dataclass(frozen=True)
class Load:
    """One copy into a fast-tier slot, after evicting `victim` (None: the slot was free)."""

    key: ExpertKey
    slot: int
    victim: ExpertKey | None = None


@dataclass(frozen=True)
class DemandPlan:
    """One layer visit. Every key is accessed once; each miss is loaded, streamed or skipped."""

    keys: tuple[ExpertKey, ...]  # the distinct keys the batch uses at this layer, in access order
    hits: tuple[ExpertKey, ...]  # resident (possibly still in flight)
    loads: tuple[Load, ...]  # misses that take a slot
    streamed: tuple[ExpertKey, ...]  # misses with no slot to take: staged for this visit only
    skipped: tuple[ExpertKey, ...] = ()  # misses the executor serves another way (host compute)

    @property
    def misses(self) -> tuple[ExpertKey, ...]:
        return tuple(l.key for l in self.loads) + self.streamed + self.skipped


@dataclass(frozen=True)
class PrefetchPlan:
    """Forecast keys to load before they are needed, at most the limit."""

    loads: tuple[Load, ...]


@dataclass(frozen=True)
class KeepPlan:
    """Belady's end of a visit: evict these residents, admit these loads, stream the rest."""

    evict: tuple[ExpertKey, ...]
    admit: tuple[ExpertKey, ...]
    streamed: tuple[ExpertKey, ...]


_NO_VICTIM = (-math.inf,)  # refusal rank of a pool with no candidate: refuses every key


class _Slots:
    """The slots a plan hands out, as CacheState would: free slots first (its stack order), else
    a victim's slot. Tracks what the plan already took so nothing is chosen twice."""

    def __init__(self, state: "CacheState", protect: Iterable[ExpertKey]) -> None:
        self.state = state
        self.free: dict[int, list[int]] = {}
        self.taken: set[ExpertKey] = set(protect)  # planned keys and chosen victims
        # pool -> rank of the best key it refused. A pool that refused stays as it was (nothing is
        # taken from it afterwards), so its victim is the same and refuses every key ranked no
        # better: replay plans a prefetch per forecast key, and this skips re-ranking for each.
        self.refused: dict[int, tuple] = {}

    def take(self, key: ExpertKey, policy: str, inputs: PolicyInputs,
             incoming: Prediction | None = None, accept=None) -> Load | None:
        """A slot for `key`, or None. With `incoming` (a prefetch's forecast for `key`) a victim
        is taken only where policies.should_displace allows. `accept(load) -> bool`, when given,
        has the last word on the load found (nothing is taken when it says no)."""
        st = self.state
        pool = st.pool_of(key)
        if pool not in self.free:
            self.free[pool] = list(st.free_slots[pool])
        free = self.free[pool]
        if free:
            if accept is not None and not accept(Load(key, free[-1])):
                return None
            self.taken.add(key)
            return Load(key, free.pop())
        rank = (math.inf,) if incoming is None else (incoming.distance, -incoming.score)
        if pool in self.refused and rank >= self.refused[pool]:
            return None
        victims = choose_victims(policy, st.candidates(pool, exclude=self.taken), 1, inputs)
        if not victims:
            self.refused[pool] = _NO_VICTIM
            return None
        victim = victims[0]
        if incoming is not None and not should_displace(incoming, victim, inputs):
            self.refused[pool] = min(rank, self.refused.get(pool, rank))
            return None
        load = Load(key, st.entries[victim].slot, victim)
        if accept is not None and not accept(load):
            return None
        self.taken.update((key, victim))
        return load


def plan_demand(state: "CacheState", keys: Iterable[ExpertKey], policy: str,
                predicted: Mapping[ExpertKey, Prediction] | None = None,
                skip: Iterable[ExpertKey] = (), position: Position | None = None) -> DemandPlan:
    """A layer visit under a demand policy (lru, lfu, predictive): a miss takes a free slot, else
    evicts the policy's victim among the candidates, else (every slot of its pool pinned, needed
    or in flight) is streamed. `skip`: misses not to load at all (the cache runs them on the host).
    `predicted`: the forecast in force (ranks victims under predictive; with `position`, by
    expected next use: policies.forecast_next_use)."""
    keys = tuple(dict.fromkeys(keys))
    skip = set(skip)
    inputs = state.policy_inputs(predicted, position=position)
    slots = _Slots(state, keys)  # the visit's own keys are needed: never victims
    hits, loads, streamed, skipped = [], [], [], []
    for key in keys:
        if state.is_resident(key):
            hits.append(key)
        elif key in skip:
            skipped.append(key)
        else:
            load = slots.take(key, policy, inputs)
            if load is None:
                streamed.append(key)
            else:
                loads.append(load)
    return DemandPlan(keys, tuple(hits), tuple(loads), tuple(streamed), tuple(skipped))


def plan_prefetch(state: "CacheState", candidates: Iterable[ExpertKey],
                  predicted: Mapping[ExpertKey, Prediction], limit: int,
                  position: Position | None = None,
                  costs: PrefetchCosts | None = None) -> PrefetchPlan:
    """Up to `limit` of `candidates` (forecast keys, in prefetch order: forecast.prefetch_order),
    each into a free slot or the predictive victim's slot where policies.should_displace allows;
    a candidate with no such slot is skipped, not waited for. Without should_displace two
    prefetches could evict each other's forecast experts (thrashing).

    With `costs`, a candidate is issued only where cost_model.prefetch_gain is positive for its
    probability (Prediction.prob), its place in the transfer queue (costs.queued + the loads
    planned before it) and the slot it would take (free, or its victim's chance of being used
    at its own forecast visit, and of reuse later: by its age from the position's measured
    reuse rates, else costs.victim_reuse): the bandwidth-aware rule."""
    if limit <= 0 or not predicted:
        return PrefetchPlan(())
    inputs = state.policy_inputs(predicted, position=position)
    slots = _Slots(state, ())
    loads: list[Load] = []

    def worth_it(load: Load) -> bool:
        p = predicted[load.key]
        victim_prob, victim_now = None, 0.0
        if load.victim is not None:
            v = predicted.get(load.victim)
            if v is not None:  # forecast: its chance of being needed at its own visit
                victim_now = 1.0 if v.prob is None else v.prob
            # later reuse: measured by its age, else the cache's measured early-reload rate
            q = None if position is None else reuse_chance(load.victim, position,
                                                           state.last_use.get(load.victim))
            victim_prob = costs.victim_reuse if q is None else q
        prob = 1.0 if p.prob is None else p.prob
        return prefetch_gain(prob, p.distance, costs.queued + len(loads), victim_prob, costs,
                             victim_now) > 0

    for key in candidates:
        if len(loads) >= limit:
            break
        if state.is_resident(key) or key in slots.taken:
            continue
        load = slots.take(key, "predictive", inputs, incoming=predicted[key],
                          accept=None if costs is None else worth_it)
        if load is not None:
            loads.append(load)
    return PrefetchPlan(tuple(loads))


def plan_keep(state: "CacheState", loaded: Iterable[ExpertKey],
              next_use: Mapping[ExpertKey, float]) -> KeepPlan:
    """Belady (offline replay only), after a visit whose misses `loaded` were all fetched: per
    pool keep the soonest-used set of old movable residents and new loads (policies.belady_keep),
    evict the other residents, stream the other loads. Call with the needed keys cleared: the
    layer has run, so its keys may go too."""
    inputs = state.policy_inputs(next_use=next_use)
    pools: dict[int, list[ExpertKey]] = {}
    for key in loaded:
        pools.setdefault(state.pool_of(key), []).append(key)
    evict, admit, streamed = [], [], []
    for pool, keys in pools.items():
        movable = state.candidates(pool)  # needed is cleared: all but pinned and in flight
        room = state.capacity(pool) - (len(state.pool_keys[pool]) - len(movable))
        keep = belady_keep(movable, keys, room, inputs)
        evict.extend(sorted(movable - keep))
        for key in keys:
            (admit if key in keep else streamed).append(key)
    return KeepPlan(tuple(evict), tuple(admit), tuple(streamed))


# -- cancelling queued prefetches (copy_queue.py: only copies not yet submitted can be) ----------
def prefetches_to_drop(queued: Iterable[ExpertKey], layer: int, used: Iterable[ExpertKey],
                       predicted: Mapping[ExpertKey, Prediction] | None) -> tuple[list[ExpertKey], list[ExpertKey]]:
    """(proven wrong, withdrawn) among the queued prefetches as layer `layer` is about to run with
    `used`: one of `layer` that it does not use is proven wrong; one of another layer that the
    forecast in force (`predicted`, made after the previous layer routed) no longer votes for
    (absent, or only a runner-up) was withdrawn. Without a forecast nothing is withdrawn. Both
    keep queue order."""
    used = set(used)
    queued = list(queued)
    wrong = [k for k in queued if k[0] == layer and k not in used]
    withdrawn = [] if predicted is None else [
        k for k in queued if k[0] != layer and (k not in predicted or predicted[k].score <= 0)]
    return wrong, withdrawn


def demand_shortfall(state: "CacheState", keys: Iterable[ExpertKey],
                     skip: Iterable[ExpertKey] = ()) -> dict[int, int]:
    """Per pool, how many of the visit's misses plan_demand would stream for want of a slot:
    misses (not resident, not in `skip`) beyond the pool's free slots and eviction candidates.
    Call with the visit's keys marked needed, as plan_demand is."""
    skip = set(skip)
    misses: dict[int, int] = {}
    for key in dict.fromkeys(keys):
        if not state.is_resident(key) and key not in skip:
            pool = state.pool_of(key)
            misses[pool] = misses.get(pool, 0) + 1
    out = {}
    for pool, n in misses.items():
        short = n - state.num_free(pool) - len(state.candidates(pool))
        if short > 0:
            out[pool] = short
    return out


def prefetches_to_reclaim(queued: Iterable[ExpertKey], shortfall: Mapping[int, int],
                          pool_of) -> list[ExpertKey]:
    """Queued prefetches whose slots the visit's misses take instead of streaming: per pool up to
    its shortfall, the latest queued first (prefetches are queued nearest layer and likeliest
    first, so the last is the one that matters least)."""
    need = dict(shortfall)
    out = []
    for key in reversed(list(queued)):
        pool = pool_of(key)
        if need.get(pool, 0) > 0:
            out.append(key)
            need[pool] -= 1
    return out
