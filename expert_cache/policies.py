"""Pure eviction policies: which resident experts to give up, over plain data (no torch).

Every policy is a total order on the eviction candidates, most evictable first; the victims are a
prefix of it. Orders end in the key itself, so equal inputs always give equal outputs (the
simulator's results and the tests' exact expectations depend on that).

Policies never see pinned, in-flight or needed keys: `eviction_candidates` removes them before any
policy runs, so no policy can break the never-evict rules however it ranks (terms: the glossary
in docs/expert-cache.md).

Time is an integer tick the caller advances (the simulator uses one tick per layer visit). A key
never used has last use -1, i.e. it is the least recently used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping

ExpertKey = tuple[int, int]  # (MoE layer index, logical expert id)
PolicyName = Literal["lru", "lfu", "predictive", "belady"]
POLICIES: tuple[str, ...] = ("lru", "lfu", "predictive", "belady")
NEVER = math.inf  # next use of a key that is not used again


@dataclass(frozen=True)
class Prediction:
    """A predictor's forecast for one key, aggregated over the batch."""

    distance: int  # layers ahead of the layer just computed (1 = the next MoE layer)
    score: float  # batch aggregate, e.g. how many tokens have the expert in their predicted top-k
    # Chance the key is used at its layer this step: votes / tokens, times the forecaster's
    # measured precision at this distance (forecast.with_probabilities). None: not estimated
    # (ranked as certain).
    prob: float | None = None
    # Votes per grade (router_predict.graded: how confident each vote is); () when not graded.
    grades: tuple[int, ...] = ()


@dataclass(frozen=True)
class Position:
    """Where the model is when a plan is made: right after MoE layer `layer` routed, with a
    forecast covering layers layer+1 .. layer+horizon. Lets `predictive` compare keys of
    different layers by when they are next used (forecast_next_use)."""

    layer: int
    num_layers: int  # L
    horizon: int  # layers the forecast in force covers (the look-ahead depth)
    now: int | None = None  # the tick of this visit (with `reuse`: steps since a key's last use)
    # reuse[r]: measured chance a key is used at a visit of its layer when its last use was r+1
    # steps before (CacheState.reuse_probabilities; the last entry covers every older key).
    # Empty: every unforecast key counts as used at its layer's next visit.
    reuse: tuple[float, ...] = ()


@dataclass(frozen=True)
class PolicyInputs:
    """What the policies read. Each policy uses only its own fields; missing keys have defaults."""

    last_use: Mapping[ExpertKey, int] = field(default_factory=dict)  # tick of last hit or load
    use_count: Mapping[ExpertKey, int] = field(default_factory=dict)  # accesses since start (LFU)
    predicted: Mapping[ExpertKey, Prediction] = field(default_factory=dict)  # latest forecast only
    next_use: Mapping[ExpertKey, float] = field(default_factory=dict)  # tick of next access (Belady)
    position: Position | None = None  # predictive: rank by forecast next use (None: by distance)


def eviction_candidates(resident: Iterable[ExpertKey], pinned: Iterable[ExpertKey] = (),
                        in_flight: Iterable[ExpertKey] = (),
                        needed: Iterable[ExpertKey] = ()) -> list[ExpertKey]:
    """Resident keys that may be evicted, sorted: resident minus pinned, in-flight and needed."""
    protected = set(pinned) | set(in_flight) | set(needed)
    return sorted(k for k in set(resident) if k not in protected)


def lru_key(inputs: PolicyInputs) -> Callable[[ExpertKey], tuple]:
    """Least recently used first."""
    last = inputs.last_use.get
    return lambda k: (last(k, -1), k)


def lfu_key(inputs: PolicyInputs) -> Callable[[ExpertKey], tuple]:
    """Fewest uses first (counts survive eviction, so a returning hot expert keeps its history);
    ties by LRU."""
    last, count = inputs.last_use.get, inputs.use_count.get
    return lambda k: (count(k, 0), last(k, -1), k)


def predictive_key(inputs: PolicyInputs) -> Callable[[ExpertKey], tuple]:
    """Unpredicted keys first (by LRU); then predicted ones, furthest distance first, then lowest
    batch score, then LRU. Keeps exactly what the predictor says the coming layers will use."""
    last, pred = inputs.last_use.get, inputs.predicted.get

    def key(k: ExpertKey) -> tuple:
        p = pred(k)
        if p is None:
            return (0, 0, 0.0, last(k, -1), k)
        return (1, -p.distance, p.score, last(k, -1), k)

    return key


def predicted_next_use(p: Prediction, num_layers: int) -> float:
    """Expected visits until a key forecast as `p` is used: d + (1 - prob) L."""
    return p.distance + (1.0 - (1.0 if p.prob is None else p.prob)) * num_layers


def forecast_next_use(key: ExpertKey, pos: Position, predicted: Mapping[ExpertKey, Prediction],
                      last_use: int | None = None) -> float:
    """Expected MoE-layer visits until `key` is used, from the forecast in force (Belady driven
    by forecasts; MoE-Infinity's priority idea). Layer m next runs `ahead` = (m - layer) mod L
    visits from now (L for the layer just routed: it runs now, its keys are needed, and its next
    run is the next step's).
      - forecast with probability p at distance d: d if used this step, else a step later:
        d + (1 - p) L;
      - unforecast but inside the horizon: the forecast says not this step: ahead + L;
      - beyond the horizon: nothing known, the earliest use: ahead;
      - an unforecast key's estimate then grows by L (1 - q) / q when the position carries
        measured reuse rates q (by steps since the key's `last_use`): a key not used for long is
        unlikely at its next visit too. Keys never used have no last use: the earliest use.
    Pure; a smaller value means more valuable to keep."""
    L = pos.num_layers
    ahead = (key[0] - pos.layer) % L or L
    p = predicted.get(key)
    if p is not None:
        return predicted_next_use(p, L)
    first = ahead + L if ahead <= pos.horizon else ahead
    if not pos.reuse or pos.now is None or last_use is None:
        return first
    # With a measured reuse rate q (by steps since the last use): the layer's visits are L
    # apart and each uses the key with chance q, so on average (1 - q) / q visits are skipped.
    q = max(reuse_chance(key, pos, last_use), 1e-3)
    return first + L * (1.0 - q) / q


def reuse_chance(key: ExpertKey, pos: Position, last_use: int | None) -> float | None:
    """Measured chance an unforecast `key` is used at its layer's next visit, from the steps
    since its `last_use` (Position.reuse); None when not measured or the key was never used."""
    if not pos.reuse or pos.now is None or last_use is None:
        return None
    L = pos.num_layers
    ahead = (key[0] - pos.layer) % L or L
    r = (pos.now + ahead - last_use - 1) // L
    return pos.reuse[min(max(r, 0), len(pos.reuse) - 1)]


def forecast_belady_key(inputs: PolicyInputs) -> Callable[[ExpertKey], tuple]:
    """predictive with a Position: furthest expected next use first (forecast_next_use), ties
    by lowest votes, then LRU. In a per-layer pool every unforecast key has the same expected
    next use, so those go in LRU order, as without a forecast."""
    last, pred, pos = inputs.last_use.get, inputs.predicted, inputs.position

    def key(k: ExpertKey) -> tuple:
        p = pred.get(k)
        return (-forecast_next_use(k, pos, pred, last(k)), 0.0 if p is None else p.score,
                last(k, -1), k)

    return key


def belady_key(inputs: PolicyInputs) -> Callable[[ExpertKey], tuple]:
    """Next use furthest in the future first (never used again = furthest); ties by LRU."""
    last, nxt = inputs.last_use.get, inputs.next_use.get
    return lambda k: (-nxt(k, NEVER), last(k, -1), k)


# Each builds a sort key for one set of inputs, binding the dict lookups once: replay ranks the
# candidates on every miss, so this is the simulator's hot loop.
RANK_KEYS: dict[str, Callable[[PolicyInputs], Callable[[ExpertKey], tuple]]] = {
    "lru": lru_key, "lfu": lfu_key, "predictive": predictive_key, "belady": belady_key,
}


def _rank_key(policy: str, inputs: PolicyInputs) -> Callable[[ExpertKey], tuple]:
    if policy == "predictive" and not inputs.predicted and inputs.position is None:
        # no forecast in force: predictive_key's order is LRU's, and LRU's key is the cheaper
        # call (a switched-off predictive cache then ranks at LRU's cost)
        return lru_key(inputs)
    if policy == "predictive" and inputs.position is not None:
        return forecast_belady_key(inputs)
    try:
        return RANK_KEYS[policy](inputs)
    except KeyError:
        raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")


def eviction_order(policy: str, candidates: Iterable[ExpertKey],
                   inputs: PolicyInputs) -> list[ExpertKey]:
    """All candidates, most evictable first, under `policy`."""
    return sorted(set(candidates), key=_rank_key(policy, inputs))


def choose_victims(policy: str, candidates: Iterable[ExpertKey], n: int,
                   inputs: PolicyInputs) -> list[ExpertKey]:
    """Up to `n` victims from `candidates` (fewer when there are fewer candidates)."""
    if n < 0:
        raise ValueError(f"cannot choose {n} victims")
    key = _rank_key(policy, inputs)
    if n == 1:  # the common case (one miss): a linear min instead of a full sort
        cands = list(candidates)
        return [min(cands, key=key)] if cands else []
    return sorted(set(candidates), key=key)[:n]


def belady_keep(resident: Iterable[ExpertKey], loaded: Iterable[ExpertKey], room: int,
                inputs: PolicyInputs) -> set[ExpertKey]:
    """Optimal offline choice after a layer visit: which of the `resident` keys and the keys just
    `loaded` for this visit (misses, all fetched anyway) to keep in `room` slots.

    Keeps the `room` keys whose next use is soonest; on equal next use a resident key wins (it
    costs no copy), then the smaller key. Keeping the soonest-needed set is Belady's rule with
    bypass: a missed key used later than everything kept is streamed rather than admitted. Every
    demand policy ends a visit with some such subset, so this choice needs the fewest loads.
    """
    resident = set(resident)
    contenders = resident | set(loaded)

    def order(k: ExpertKey) -> tuple:
        return (inputs.next_use.get(k, NEVER), k not in resident, k)

    return set(sorted(contenders, key=order)[:max(room, 0)])


def should_displace(incoming: Prediction, victim: ExpertKey, inputs: PolicyInputs) -> bool:
    """For a prefetch: evict `victim` for a key forecast as `incoming` only if the victim is worth
    less to keep, i.e. unpredicted, predicted further away, or equally far with a lower score.
    Without this check two prefetches could evict each other's forecast experts (thrashing)."""
    if inputs.position is not None:  # by expected next use, so probabilities count too
        mine = predicted_next_use(incoming, inputs.position.num_layers)
        return forecast_next_use(victim, inputs.position, inputs.predicted,
                                 inputs.last_use.get(victim)) > mine
    p = inputs.predicted.get(victim)
    if p is None:
        return True
    return (p.distance, -p.score) > (incoming.distance, -incoming.score)
