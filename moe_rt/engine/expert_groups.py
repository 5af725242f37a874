"""Grouping sequences by the experts they are predicted to use (ExpertFlow's regrouping). Pure.

Shape legend: N sequences, L MoE layers. A sequence's *route* is, per MoE layer, the set of
experts it is predicted to use at its next token (the runtime predicts it by the experts its
previous token used: consecutive tokens of one sequence tend to share experts). Batching
sequences together costs, per layer, the union of their routes: an offloaded expert is loaded
once for the whole batch, so sequences whose routes overlap are cheap to step together.

`marginal_cost` is the one cost rule; `greedy_groups` (partition) and `grow_group` (one step's
batch) apply it. Expert sets are plain frozensets of ints, so the functions carry no torch and
their outputs are exact (tests/moe_rt/test_expert_groups.py).
"""
from __future__ import annotations

from typing import Mapping, Sequence

Route = Sequence[frozenset[int]]  # [L] experts per MoE layer
WARM_COST = 0.25  # an expert in the warm set (probably resident) costs this much of a cold one


def marginal_cost(route: Route, union: Sequence[set[int]], warm: Sequence[frozenset[int]] | None = None) -> float:
    """What adding `route` to a batch whose per-layer union is `union` costs: each expert not yet
    in the union costs 1, or WARM_COST if it is in `warm` (an estimate of what the fast tier
    holds: loading it is free, computing it is not)."""
    cost = 0.0
    for l, experts in enumerate(route):
        for e in experts:
            if e not in union[l]:
                cost += WARM_COST if warm is not None and e in warm[l] else 1.0
    return cost


def grow_group(seed: Sequence[int], candidates: Sequence[int], routes: Mapping[int, Route], size: int,
               num_layers: int, warm: Sequence[frozenset[int]] | None = None) -> list[int]:
    """The batch: `seed` (always kept, in order, even beyond `size`) plus candidates added one at
    a time, each the one with the least marginal cost (ties: earliest in `candidates`), until the
    batch holds `size`. A candidate without a route (nothing known about it yet) costs nothing,
    so it is taken first: it is about to tell us its route."""
    group = list(seed)
    union: list[set[int]] = [set() for _ in range(num_layers)]
    for i in group:
        _add(union, routes.get(i))
    rest = [i for i in candidates if i not in set(group)]
    while len(group) < size and rest:
        best = min(range(len(rest)), key=lambda j: (_cost(routes.get(rest[j]), union, warm), j))
        pick = rest.pop(best)
        group.append(pick)
        _add(union, routes.get(pick))
    return group


def greedy_groups(items: Sequence[int], routes: Mapping[int, Route], cap: int,
                  num_layers: int) -> list[list[int]]:
    """Partition `items` into groups of at most `cap` with small per-layer unions: each group is
    seeded with the first item left (so earlier items lead earlier groups) and grown by
    `grow_group`. Every item lands in exactly one group; the groups come in seed order."""
    if cap < 1:
        raise ValueError(f"group size cap must be >= 1, got {cap}")
    left = list(items)
    groups = []
    while left:
        group = grow_group(left[:1], left[1:], routes, cap, num_layers)
        groups.append(group)
        taken = set(group)
        left = [i for i in left if i not in taken]
    return groups


def union_sizes(group: Sequence[int], routes: Mapping[int, Route], num_layers: int) -> list[int]:
    """[L] distinct experts the group's routes use per layer."""
    union: list[set[int]] = [set() for _ in range(num_layers)]
    for i in group:
        _add(union, routes.get(i))
    return [len(u) for u in union]


def _cost(route: Route | None, union, warm) -> float:
    return 0.0 if route is None else marginal_cost(route, union, warm)


def _add(union: list[set[int]], route: Route | None) -> None:
    if route is not None:
        for l, experts in enumerate(route):
            union[l].update(experts)
