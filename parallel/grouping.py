"""Speculative expert grouping (s-EG): place experts that tokens use together on the same rank.

Offline and pure: from a routing trace's topk_ids it counts how often experts are used together,
then assigns each MoE layer's experts to N ranks so that (a) a token's k experts at one layer sit
on few ranks and (b) they sit on the rank that held its experts at the previous layer, where
speculative token shuffling (s-TS) will already have sent it. Both cut all-to-all traffic
(parallel/traffic.py measures how much). Idea from Speculative MoE, arXiv 2503.04398.

Shape legend: T tokens (trace rows), L MoE layers, k experts per token, E experts per layer,
N ranks.

Objective for layer l, given the ranks already chosen for layer l-1 (layers are planned in order):
    sum over expert pairs {a, b} on one rank of coact[l, a, b]
  + cross_layer_weight * sum over (a at l-1, b at l) on one rank of affinity[l-1, a, b]
Both terms count token-level pairs, so they are exact surrogates for "pairs of one token's
experts that need no hop between them".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe_rt.errors import MoeRtError
from parallel.placement import ExpertParallelPlacement


@dataclass(frozen=True)
class GroupingOptions:
    """Knobs of the s-EG planner."""

    ranks: int  # N, expert-parallel world size; must divide E
    replicas: int = 0  # R: extra copy of each layer's R hottest experts
    cross_layer_weight: float = 1.0  # weight of term (b) relative to term (a)
    load_tolerance: float | None = 0.1  # rank token load <= (1 + tol) * mean; None: count balance only
    max_swaps: int | None = None  # local-search swaps per layer; None: 4 * E
    capacity_per_rank: int | None = None  # slots per rank with replicas; None: E/N + ceil(R/N)


@dataclass(frozen=True)
class CoactivationStats:
    """Counts over the trace's tokens; all int64, all exact."""

    load: np.ndarray  # [L, E] tokens routed to each expert
    coact: np.ndarray  # [L, E, E] tokens that used both a and b at layer l; symmetric, zero diagonal
    affinity: np.ndarray  # [L-1, E, E] tokens that used a at layer l and b at layer l+1


def check_topk_ids(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """topk_ids [T, L, k] as int64, or MoeRtError naming the problem."""
    ids = np.asarray(topk_ids)
    if ids.ndim != 3 or ids.shape[0] == 0 or ids.shape[1] == 0 or ids.shape[2] == 0:
        raise MoeRtError(f"topk_ids must be a non-empty [T, L, k] array, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise MoeRtError(f"topk_ids must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.min() < 0 or ids.max() >= num_experts:
        raise MoeRtError(f"topk_ids has experts outside [0, {num_experts})")
    if ids.shape[2] > 1:
        s = np.sort(ids, axis=-1)
        if (s[..., 1:] == s[..., :-1]).any():
            raise MoeRtError("topk_ids repeats an expert within one token's top-k")
    return ids


def coactivation_stats(topk_ids: np.ndarray, num_experts: int) -> CoactivationStats:
    """Load, same-layer co-activation and next-layer affinity counts of topk_ids [T, L, k]."""
    ids = check_topk_ids(topk_ids, num_experts)
    _, num_layers, _ = ids.shape
    e = num_experts
    load = np.stack([np.bincount(ids[:, l].ravel(), minlength=e) for l in range(num_layers)])
    coact = np.zeros((num_layers, e, e), dtype=np.int64)
    affinity = np.zeros((max(num_layers - 1, 0), e, e), dtype=np.int64)
    for l in range(num_layers):
        a = ids[:, l]
        # Every ordered pair (i, j) of one token's choices; i == j lands on the diagonal, cleared.
        pairs = (a[:, :, None] * e + a[:, None, :]).ravel()
        coact[l] = np.bincount(pairs, minlength=e * e).reshape(e, e)
        np.fill_diagonal(coact[l], 0)
        if l + 1 < num_layers:
            b = ids[:, l + 1]
            cross = (a[:, :, None] * e + b[:, None, :]).ravel()
            affinity[l] = np.bincount(cross, minlength=e * e).reshape(e, e)
    return CoactivationStats(load.astype(np.int64), coact, affinity)


def layer_objective(coact: np.ndarray, linear: np.ndarray, rank_of: np.ndarray) -> float:
    """Objective of one layer: coact [E, E] pairs on one rank + linear [E, N] gain of each choice."""
    same = rank_of[:, None] == rank_of[None, :]
    return float(np.triu(coact * same, 1).sum() + linear[np.arange(len(rank_of)), rank_of].sum())


def place_layer(coact: np.ndarray, load: np.ndarray, linear: np.ndarray, ranks: int,
                load_tolerance: float | None, max_swaps: int) -> np.ndarray:
    """Rank of each expert [E] int64: E/N experts per rank, greedy then best-swap local search.

    coact [E, E] symmetric pair counts; load [E] tokens per expert; linear [E, N] gain of putting
    expert e on rank r (the cross-layer term). Deterministic: ties go to the lower index.
    """
    e = len(load)
    per_rank = e // ranks
    w = load.astype(np.float64)
    cap = math.inf if load_tolerance is None else (1.0 + load_tolerance) * w.sum() / ranks
    c = coact.astype(np.float64)
    gain = linear.astype(np.float64).copy()  # gain[x, r]: objective added by x sitting on r
    rank_of = np.full(e, -1, dtype=np.int64)
    count = np.zeros(ranks, dtype=np.int64)
    rload = np.zeros(ranks, dtype=np.float64)

    # Greedy: hottest experts first, each to the open rank it gains most from, within the load cap.
    for x in np.argsort(-w, kind="stable"):
        free = count < per_rank
        fits = free & (rload + w[x] <= cap)
        if fits.any():
            score = np.where(fits, gain[x], -np.inf)
            ties = score == score.max()
        else:  # nothing fits: balance beats affinity
            ties = free & (rload == rload[free].min())
        r = int(np.argmin(np.where(ties, rload, np.inf)))
        rank_of[x], count[r], rload[r] = r, count[r] + 1, rload[r] + w[x]
        gain[:, r] += c[:, x]

    # Local search: apply the best objective-improving swap until none is left. A swap keeps every
    # rank's expert count; it may not push a rank above the cap, and a rank already above it may
    # only get lighter, so the load balance never gets worse than the greedy left it.
    eps = 1e-12 * (np.abs(c).sum() + np.abs(gain).sum() + 1.0)
    upper = np.triu(np.ones((e, e), dtype=bool), 1)
    for _ in range(max_swaps):
        own = gain[np.arange(e), rank_of]
        across = gain[:, rank_of]  # across[a, b] = gain of a on b's rank
        delta = across + across.T - own[:, None] - own[None, :] - 2.0 * c
        load_a = rload[rank_of][:, None] - w[:, None] + w[None, :]  # a's rank after the swap
        load_b = rload[rank_of][None, :] - w[None, :] + w[:, None]  # b's rank after the swap
        ok = (upper & (rank_of[:, None] != rank_of[None, :])
              & ((load_a <= cap) | (w[None, :] <= w[:, None]))
              & ((load_b <= cap) | (w[:, None] <= w[None, :])))
        delta = np.where(ok, delta, -np.inf)
        best = int(np.argmax(delta))
        if not delta.flat[best] > eps:
            break
        a, b = divmod(best, e)
        ra, rb = int(rank_of[a]), int(rank_of[b])
        gain[:, ra] += c[:, b] - c[:, a]
        gain[:, rb] += c[:, a] - c[:, b]
        rload[ra] += w[b] - w[a]
        rload[rb] += w[a] - w[b]
        rank_of[a], rank_of[b] = rb, ra
    return rank_of


def cross_layer_gain(affinity: np.ndarray, prev_rank_of: np.ndarray, ranks: int,
                     weight: float) -> np.ndarray:
    """[E, N]: weight * tokens whose layer-(l-1) expert on rank r is followed by expert b at l."""
    onehot = np.zeros((len(prev_rank_of), ranks), dtype=np.float64)
    onehot[np.arange(len(prev_rank_of)), prev_rank_of] = 1.0
    return weight * (onehot.T @ affinity.astype(np.float64)).T


def add_replicas(rank_of: np.ndarray, load: np.ndarray, need: np.ndarray, count: int,
                 capacity: int) -> dict[int, list[int]]:
    """expert -> ranks for one layer: primaries from rank_of, plus a copy of each of the `count`
    hottest experts on the rank that needs it most (need [E, N]), while that rank has a free slot.

    A replica nobody needs (need 0 on every open rank) is not placed: it would cost memory only.
    """
    ranks = need.shape[1]
    holders = {int(x): [int(rank_of[x])] for x in range(len(rank_of))}
    slots = np.bincount(rank_of, minlength=ranks)
    for x in np.argsort(-load, kind="stable")[:count]:
        open_ = slots < capacity
        open_[holders[int(x)]] = False
        score = np.where(open_, need[x], -np.inf)
        if not open_.any() or score.max() <= 0:
            continue
        ties = score == score.max()
        r = int(np.argmin(np.where(ties, slots, np.iinfo(np.int64).max)))
        holders[int(x)].append(r)
        slots[r] += 1
    return holders


def plan_expert_groups(topk_ids: np.ndarray, num_experts: int,
                       options: GroupingOptions) -> ExpertParallelPlacement:
    """s-EG placement of every layer of topk_ids [T, L, k] on options.ranks ranks."""
    n = options.ranks
    if n < 1 or num_experts % n:
        raise MoeRtError(f"{n} ranks do not divide {num_experts} experts")
    if not 0 <= options.replicas <= num_experts:
        raise MoeRtError(f"replicas must be in [0, {num_experts}], got {options.replicas}")
    if options.load_tolerance is not None and options.load_tolerance < 0:
        raise MoeRtError(f"load tolerance must be >= 0, got {options.load_tolerance}")
    per_rank = num_experts // n
    capacity = options.capacity_per_rank
    if capacity is None:
        capacity = per_rank + math.ceil(options.replicas / n)
    if capacity < per_rank:
        raise MoeRtError(f"capacity_per_rank {capacity} is below the {per_rank} experts each rank "
                         "must hold")
    stats = coactivation_stats(topk_ids, num_experts)
    max_swaps = 4 * num_experts if options.max_swaps is None else options.max_swaps
    layers: dict[int, dict[int, list[int]]] = {}
    prev: np.ndarray | None = None
    for l in range(stats.load.shape[0]):
        linear = (np.zeros((num_experts, n)) if prev is None else
                  cross_layer_gain(stats.affinity[l - 1], prev, n, options.cross_layer_weight))
        rank_of = place_layer(stats.coact[l], stats.load[l], linear, n, options.load_tolerance,
                              max_swaps)
        need = cross_layer_gain(stats.coact[l], rank_of, n, 1.0) + linear
        layers[l] = add_replicas(rank_of, stats.load[l], need, options.replicas, capacity)
        prev = rank_of
    return ExpertParallelPlacement(ranks=n, layers=layers, capacity_per_rank=capacity,
                                   planner="s-EG")
