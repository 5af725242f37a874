"""How confident each vote of a forecast is: the share of the token's score mass its expert has.

A forecast's votes (a token's predicted top-k) are not equally good. Gate look-ahead's first choice
for the next layer is right far more often than its second, and within either a peaked score
(softmax share 0.7) is right far more often than a flat one (0.15): on the demo model's held-out
trace, distance 1, experts with share >= 0.3 are used 78-99% of the time, those under 0.2 at most
a third (docs/benchmarks.md). A prefetcher that knows only "one vote" must treat both alike.

So each vote carries a grade: the bucket of its expert's softmax share of the token's scores,
relative to a uniform router's (SHARE_EDGES), and the runner-ups (ranks k..2k-1) are graded
too. The expert cache calibrates every (distance, grade) online against what the layer then uses
(expert_cache.forecast.ForecastAccuracy), which turns grades into probabilities; the edges only
need to be monotone, not right for any model. Scores that are not logits (a biased
sigmoid router) give small, flat shares: every vote falls in the low buckets and calibration
degrades to one precision per distance, the rule without grades.

Shape legend: N rows (tokens, or distance x tokens), E experts, k experts per row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from moe_rt.layers.moe.events import Forecast

# Share buckets in multiples of a uniform router's share 1/E (bucket b: share * E >= edge b-1), so
# a 16-expert and a 256-expert model grade a vote by how far it stands out of an even split.
SHARE_EDGES = (0.8, 1.6, 3.2, 4.8, 6.4, 8.0, 11.2)
NUM_SHARES = len(SHARE_EDGES) + 1
# A grade is a share bucket, offset by NUM_SHARES for a runner-up: an expert ranked just below a
# token's top-k (ranks k..2k-1). Runner-ups cast no vote (nothing is prefetched for them) but get
# a calibrated probability too, so a resident runner-up is not taken for an expert the forecast
# rules out when the cache picks what to evict.
NUM_GRADES = 2 * NUM_SHARES


def vote_grades(scores: torch.Tensor, picked: Sequence[Sequence[int]], top_k: int) -> list[list[int]]:
    """For scores [N, E] and each row's picked experts (ranked; the first top_k are its votes,
    the rest runner-ups), each pick's grade (0..NUM_GRADES-1)."""
    if not len(picked):
        return []
    share = torch.softmax(scores.float(), dim=-1) * scores.shape[-1]  # 1: a uniform router's share
    # only the picks' shares leave torch (a prefill's [N, E] as lists would cost more than this)
    share = share.gather(1, torch.tensor(picked, dtype=torch.long).reshape(len(picked), -1))
    buckets = torch.bucketize(share, torch.tensor(SHARE_EDGES, dtype=share.dtype), right=True)
    if buckets.shape[1] > top_k:
        buckets[:, top_k:] += NUM_SHARES
    return buckets.tolist()


def grade_counts(rows: Sequence[Sequence[int]], grades: Sequence[Sequence[int]]) -> dict[int, tuple[int, ...]]:
    """expert -> picks per grade (a NUM_GRADES tuple), over rows of picked experts and their grades."""
    out: dict[int, list[int]] = {}
    for row, gs in zip(rows, grades):
        for e, g in zip(row, gs):
            out.setdefault(e, [0] * NUM_GRADES)[g] += 1
    return {e: tuple(c) for e, c in out.items()}


def votes_of(grades: Sequence[int]) -> int:
    """The votes among a grade tuple's picks (runner-ups excluded)."""
    return sum(grades[:NUM_SHARES])


@dataclass(frozen=True)
class GradedForecast(Forecast):
    """A Forecast whose picks carry grades: grades[e] = picks of expert e per grade (its votes,
    scores[e], are the picks of the first NUM_SHARES grades; the rest are runner-ups, which
    have no vote). Readers that know only Forecast see plain votes."""

    grades: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
