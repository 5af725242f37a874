"""What a decode step costs, measured while serving: the StepCosts expert_aware chooses with.

A step of n decode tokens that loads m experts from the slow tier takes, on this machine,

    fixed_s + token_s x n + read_s x m

read_s is measured directly: the expert cache times its demand loads (CacheProbe.load_clock:
loads and seconds waited on them, cumulative). The rest of the step, its wall time less that load
time, is fitted to fixed_s + token_s x n by least squares over the last WINDOW decode-only steps.
When the steps seen all had about the same size, token_s cannot be told from fixed_s and the
whole rest counts as fixed (token_s 0): that overstates what a smaller batch saves in step time,
so the estimate errs towards taking every sequence (fcfs), never towards shrinking.

Until MIN_SAMPLES steps are seen there is no estimate (the policy takes every sequence meanwhile,
which is also what measures). Pure arithmetic over the samples it is given; the clock reading is
the caller's (decode_policy.ExpertAware).
"""
from __future__ import annotations

import collections
import statistics

from .expert_groups import StepCosts

WINDOW = 64  # steps the fit looks back over: recent enough to follow a change of load
MIN_SAMPLES = 4
MIN_SPREAD = 2.0  # tokens: below this spread of step sizes token_s is taken as 0
OUTLIER = 5.0  # a step this many times the median rest is something else (a pause, a GC): dropped


class StepCostModel:
    def __init__(self) -> None:
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=WINDOW)  # (n, rest_s)
        self.loads = 0
        self.load_s = 0.0

    def add(self, tokens: int, step_s: float, loads: int, load_s: float) -> None:
        """One decode-only step of `tokens` tokens that took `step_s` wall seconds, `load_s` of
        them waiting on `loads` expert loads."""
        if tokens < 1 or step_s <= 0:
            return
        self.loads += loads
        self.load_s += load_s
        self.samples.append((tokens, max(step_s - load_s, 0.0)))

    def estimate(self) -> StepCosts | None:
        if len(self.samples) < MIN_SAMPLES:
            return None
        med = statistics.median(r for _, r in self.samples)
        pts = [(n, r) for n, r in self.samples if r <= OUTLIER * med] or list(self.samples)
        ns = [n for n, _ in pts]
        read_s = self.load_s / self.loads if self.loads else 0.0
        mean_n, mean_r = statistics.fmean(ns), statistics.fmean(r for _, r in pts)
        if max(ns) - min(ns) < MIN_SPREAD:
            return StepCosts(mean_r, 0.0, read_s)
        slope = (sum((n - mean_n) * (r - mean_r) for n, r in pts)
                 / sum((n - mean_n) ** 2 for n in ns))
        slope = min(max(slope, 0.0), mean_r / mean_n)  # neither negative nor above the whole step
        return StepCosts(mean_r - slope * mean_n, slope, read_s)


EPOCH = 8  # decode steps per trial of one mode
KEEP = 3  # epochs of each mode the comparison looks back over (their median)
REVISIT = 6  # after this many epochs in the chosen mode, one epoch of the other
SHRINK_GAIN = 1.03  # shrinking must have been this much faster than the whole batch to stay on


class ShrinkGate:
    """Whether the throughput choice may shrink batches now, by what shrinking measurably did.

    The choice is myopic: a smaller batch decodes its tokens faster per second, but the
    sequences it skips still need their experts later, so where routes do not cluster (a group
    does not reuse its experts next step) shrinking costs a step and saves no loads. Whether it
    pays is measured, not assumed: decode steps run in epochs of EPOCH steps, each epoch in one
    mode, `whole` (every sequence) or `shrink` (the fastest batch); each epoch's tokens per
    second is recorded. After one epoch of each, the mode whose median over its last KEEP epochs
    is faster runs (shrink only if SHRINK_GAIN times faster), and every REVISIT epochs the other
    mode gets one epoch again, so a change of workload is noticed. Pure: fed (tokens, seconds)
    of each decode-only step."""

    def __init__(self) -> None:
        self.rates: dict[str, collections.deque[float]] = {m: collections.deque(maxlen=KEEP)
                                                           for m in ("whole", "shrink")}
        self.mode = "whole"
        self._tokens, self._seconds, self._steps = 0, 0.0, 0
        self._since_revisit = 0

    @property
    def shrink(self) -> bool:
        return self.mode == "shrink"

    def add(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or seconds <= 0:
            return
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1
        if self._steps >= EPOCH:
            self.rates[self.mode].append(self._tokens / self._seconds)
            self._tokens, self._seconds, self._steps = 0, 0.0, 0
            self.mode = self._next()

    def _next(self) -> str:
        if not self.rates["shrink"]:
            return "shrink"  # not tried yet
        if not self.rates["whole"]:
            return "whole"
        whole, shrink = (statistics.median(self.rates[m]) for m in ("whole", "shrink"))
        best = "shrink" if shrink > SHRINK_GAIN * whole else "whole"
        if self.mode != best:
            self._since_revisit = 0
            return best
        self._since_revisit += 1
        if self._since_revisit >= REVISIT:
            self._since_revisit = 0
            return "whole" if best == "shrink" else "shrink"
        return best

    def stats(self) -> dict:
        return {"shrink_allowed": self.shrink,
                **{f"{m}_epoch_tok_s": statistics.median(r) for m, r in self.rates.items() if r}}
