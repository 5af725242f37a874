"""Grouping sequences by the experts they are predicted to use (ExpertFlow's regrouping). Pure.

Shape legend: N sequences, L MoE layers. A sequence's *route* is, per MoE layer, the set of
experts it is predicted to use at its next token (the runtime predicts it by the experts its
previous token used: consecutive tokens of one sequence tend to share experts). Batching
sequences together costs, per layer, the union of their routes: an offloaded expert is loaded
once for the whole batch, so sequences whose routes overlap are cheap to step together.

`marginal_cost` is the one cost rule; `greedy_groups` (partition), `grow_group` (one step's batch
of a given size) and `fastest_group` (one step's batch of the size that decodes fastest under
measured StepCosts) apply it. Expert sets are plain frozensets of ints, so the functions carry no torch and
their outputs are exact (tests/moe_rt/test_expert_groups.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

Route = Sequence[frozenset[int]]  # [L] experts per MoE layer
WARM_COST = 0.25  # an expert in the warm set (probably resident) costs this much of a cold one


@dataclass(frozen=True)
class StepCosts:
    """What one decode step takes, measured (step_costs.StepCostModel): fixed_s whatever its
    size (attention launch, Python, cache bookkeeping), token_s per token stepped, read_s per
    expert loaded from the slow tier."""
    fixed_s: float
    token_s: float
    read_s: float

    def rate(self, tokens: int, loads: float) -> float:
        """Tokens per second of a step of `tokens` tokens that loads `loads` experts."""
        t = self.fixed_s + self.token_s * tokens + self.read_s * loads
        return tokens / t if t > 0 else float(tokens)


MIN_GAIN = 1.1  # a smaller batch must promise this much more tokens/s than the larger one


def marginal_cost(route: Route, union: Sequence[set[int]], warm: Sequence[frozenset[int]] | None = None,
                  resident: Sequence[frozenset[int]] | None = None) -> float:
    """What adding `route` to a batch whose per-layer union is `union` costs: each expert not yet
    in the union costs 1; 0 if it is in `resident` (what the fast tier holds now: no load), else
    WARM_COST if it is in `warm` (an estimate of what the fast tier holds: probably no load)."""
    cost = 0.0
    for l, experts in enumerate(route):
        for e in experts:
            if e in union[l] or (resident is not None and e in resident[l]):
                continue
            cost += WARM_COST if warm is not None and e in warm[l] else 1.0
    return cost


def grow_group(seed: Sequence[int], candidates: Sequence[int], routes: Mapping[int, Route], size: int,
               num_layers: int, warm: Sequence[frozenset[int]] | None = None) -> list[int]:
    """The batch: `seed` (always kept, in order, even beyond `size`) plus candidates added one at
    a time, each the one with the least marginal cost (ties: earliest in `candidates`), until the
    batch holds `size`. A candidate without a route (nothing known about it yet) costs nothing,
    so it is taken first: it is about to tell us its route."""
    group = list(seed)
    for i, _ in _growth(seed, candidates, routes, num_layers, warm, None):
        if len(group) >= size:
            break
        group.append(i)
    return group


def fastest_group(seed: Sequence[int], candidates: Sequence[int], routes: Mapping[int, Route],
                  num_layers: int, costs: StepCosts, resident: Sequence[frozenset[int]] | None = None) -> list[int]:
    """The batch that decodes the most tokens per second: `seed` (always kept) plus the first
    candidates in grow_group's order (least marginal cost first, experts in `resident` free),
    as many as maximise costs.rate(size, expected loads). A smaller batch is taken only when it
    promises MIN_GAIN times the rate of the whole: the forecast is imperfect and a skipped
    sequence's step is only put off, not saved. So when loads are cheap next to a step's fixed
    time the whole of `candidates` is taken (fcfs); when they dominate, the batch shrinks to
    sequences that share (or find resident) their experts. At least one id is returned when
    there are candidates."""
    if costs.read_s <= 0:  # loads free: the rate only grows with the batch
        return list(seed) + [i for i in candidates if i not in set(seed)]
    order, loads, union = [], 0.0, _union_of((), routes, num_layers)
    prefix_loads = []  # prefix_loads[n - 1]: expected loads of order[:n]
    for i in seed:
        loads += _cost(routes.get(i), union, None, resident)
        _add(union, routes.get(i))
        order.append(i)
        prefix_loads.append(loads)
    for i, cost in _growth(seed, candidates, routes, num_layers, None, resident):
        order.append(i)
        loads += cost
        prefix_loads.append(loads)
    if not order:
        return []
    sizes = range(max(len(seed), 1), len(order) + 1)
    rates = {n: costs.rate(n, prefix_loads[n - 1]) for n in sizes}
    best = max(sizes, key=lambda n: (rates[n], n))
    return order[:best] if rates[best] > MIN_GAIN * rates[len(order)] else order


def _growth(seed: Sequence[int], candidates: Sequence[int], routes: Mapping[int, Route], num_layers: int,
            warm, resident) -> Iterator[tuple[int, float]]:
    """The candidates not in `seed`, each the one of least marginal cost over the union so far
    (ties: earliest in `candidates`), with that cost."""
    union = _union_of(seed, routes, num_layers)
    taken = set(seed)
    rest = [i for i in candidates if i not in taken]
    while rest:
        costs = [_cost(routes.get(i), union, warm, resident) for i in rest]
        best = min(range(len(rest)), key=lambda j: (costs[j], j))
        pick = rest.pop(best)
        _add(union, routes.get(pick))
        yield pick, costs[best]


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
    return [len(u) for u in _union_of(group, routes, num_layers)]


def _union_of(group: Sequence[int], routes: Mapping[int, Route], num_layers: int) -> list[set[int]]:
    union: list[set[int]] = [set() for _ in range(num_layers)]
    for i in group:
        _add(union, routes.get(i))
    return union


def _cost(route: Route | None, union, warm, resident=None) -> float:
    return 0.0 if route is None else marginal_cost(route, union, warm, resident)


def _add(union: list[set[int]], route: Route | None) -> None:
    if route is not None:
        for l, experts in enumerate(route):
            union[l].update(experts)
