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


@dataclass(frozen=True)
class PolicyInputs:
    """What the policies read. Each policy uses only its own fields; missing keys have defaults."""

    last_use: Mapping[ExpertKey, int] = field(default_factory=dict)  # tick of last hit or load
    use_count: Mapping[ExpertKey, int] = field(default_factory=dict)  # accesses since start (LFU)
    predicted: Mapping[ExpertKey, Prediction] = field(default_factory=dict)  # latest forecast only
    next_use: Mapping[ExpertKey, float] = field(default_factory=dict)  # tick of next access (Belady)


def eviction_candidates(resident: Iterable[ExpertKey], pinned: Iterable[ExpertKey] = (),
                        in_flight: Iterable[ExpertKey] = (),
                        needed: Iterable[ExpertKey] = ()) -> list[ExpertKey]:
    """Resident keys that may be evicted, sorted: resident minus pinned, in-flight and needed."""
    protected = set(pinned) | set(in_flight) | set(needed)
    return sorted(k for k in set(resident) if k not in protected)


def _last(inputs: PolicyInputs, key: ExpertKey) -> int:
    return inputs.last_use.get(key, -1)


def lru_rank(key: ExpertKey, inputs: PolicyInputs) -> tuple:
    """Least recently used first."""
    return (_last(inputs, key), key)


def lfu_rank(key: ExpertKey, inputs: PolicyInputs) -> tuple:
    """Fewest uses first (counts survive eviction, so a returning hot expert keeps its history);
    ties by LRU."""
    return (inputs.use_count.get(key, 0), _last(inputs, key), key)


def predictive_rank(key: ExpertKey, inputs: PolicyInputs) -> tuple:
    """Unpredicted keys first (by LRU); then predicted ones, furthest distance first, then lowest
    batch score, then LRU. Keeps exactly what the predictor says the coming layers will use."""
    p = inputs.predicted.get(key)
    if p is None:
        return (0, 0, 0.0, _last(inputs, key), key)
    return (1, -p.distance, p.score, _last(inputs, key), key)


def belady_rank(key: ExpertKey, inputs: PolicyInputs) -> tuple:
    """Next use furthest in the future first (never used again = furthest); ties by LRU."""
    return (-inputs.next_use.get(key, NEVER), _last(inputs, key), key)


RANKS: dict[str, Callable[[ExpertKey, PolicyInputs], tuple]] = {
    "lru": lru_rank, "lfu": lfu_rank, "predictive": predictive_rank, "belady": belady_rank,
}


def eviction_order(policy: str, candidates: Iterable[ExpertKey],
                   inputs: PolicyInputs) -> list[ExpertKey]:
    """All candidates, most evictable first, under `policy`."""
    try:
        rank = RANKS[policy]
    except KeyError:
        raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")
    return sorted(set(candidates), key=lambda k: rank(k, inputs))


def choose_victims(policy: str, candidates: Iterable[ExpertKey], n: int,
                   inputs: PolicyInputs) -> list[ExpertKey]:
    """Up to `n` victims from `candidates` (fewer when there are fewer candidates)."""
    if n < 0:
        raise ValueError(f"cannot choose {n} victims")
    if n == 1:  # the common case (one miss): a linear min instead of a full sort
        if policy not in RANKS:
            eviction_order(policy, (), inputs)  # raises the unknown-policy error
        cands = list(candidates)
        return [min(cands, key=lambda k: RANKS[policy](k, inputs))] if cands else []
    return eviction_order(policy, candidates, inputs)[:n]


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
    p = inputs.predicted.get(victim)
    if p is None:
        return True
    return (p.distance, -p.score) > (incoming.distance, -incoming.score)
