"""A modelled clock for replay: when each read lands and how long compute waits, on one link.

Replay (simulator.py) makes the runtime's decisions with instant copies; with a LinkClock it also
says what they would cost in time on a slow tier bound by bytes moved (the disk tier: one read at
a time, `read_s` each) and a model computing `layer_s` per MoE layer, as the runtime's executor
orders things (cache.ExpertCache.prepare):
  1. a layer's queued prefetches that it does not use are cancelled (no bytes move), and so are
     queued prefetches of other layers that the forecast in force no longer names (withdrawn;
     the same decision, planning.prefetches_to_drop);
  2. a prefetch of one of its keys still queued is read now instead (a demand read); one already
     reading is waited for;
  3. demand reads go after the read in progress (the link is shared) and before queued
     prefetches; compute waits for all of them: that wait is the stall;
  4. the layer's prefetches are queued when its compute starts; one worker reads them in order.
Not modelled: the runtime also cancels a queued prefetch whose slot a miss needs (the clock
knows no slots), and submits at most copies_in_flight copies at once (one link reads one at a
time either way). Pure Python, no I/O; a model of the runtime, not a measurement of it.
"""
from __future__ import annotations

import collections
from typing import Iterable, Mapping

from expert_cache.planning import prefetches_to_drop
from expert_cache.policies import ExpertKey, Prediction


class LinkClock:
    def __init__(self, read_s: float, layer_s: float) -> None:
        self.read_s, self.layer_s = read_s, layer_s
        self.now = 0.0  # seconds since the first layer
        self.link_free = 0.0  # when the read in progress (if any) ends
        self._queue: collections.deque[tuple[ExpertKey, float]] = collections.deque()  # not started
        self._landing: dict[ExpertKey, float] = {}  # started prefetches -> land time
        self.stall_s = 0.0
        self.reads = 0  # reads that moved bytes (cancelled prefetches excluded)

    def _start_until(self, t: float) -> None:
        while self._queue:
            key, issued = self._queue[0]
            start = max(self.link_free, issued)
            if start >= t:
                break
            self._queue.popleft()
            self.link_free = start + self.read_s
            self._landing[key] = self.link_free
            self.reads += 1

    def queued(self) -> int:
        """Reads not landed yet at `now` (for PrefetchCosts.queued)."""
        return len(self._queue) + sum(land > self.now for land in self._landing.values())

    def begin_layer(self, layer: int, keys: Iterable[ExpertKey], demand_reads: int,
                    forecast: Mapping[ExpertKey, Prediction] | None = None) -> float:
        """Layer `layer` is about to compute with `keys`, after `demand_reads` misses were
        planned, under `forecast` (the one in force, None: nothing withdrawn); returns the stall
        and moves the clock to the start of its compute."""
        t = self.now
        self._start_until(t)
        keys = set(keys)
        wrong, withdrawn = prefetches_to_drop((k for k, _ in self._queue), layer, keys, forecast)
        dropped = set(wrong) | set(withdrawn)  # step 1
        kept = collections.deque()
        for key, issued in self._queue:
            if key in keys:
                demand_reads += 1  # step 2: read now on the model thread
            elif key not in dropped:
                kept.append((key, issued))
        self._queue = kept
        ready = t
        for key in keys:
            land = self._landing.pop(key, None)
            if land is not None:
                ready = max(ready, land)
        for key in [k for k, land in self._landing.items() if land <= t]:
            del self._landing[key]
        if demand_reads:
            start = max(t, self.link_free)
            self.link_free = start + demand_reads * self.read_s
            self.reads += demand_reads
            ready = max(ready, self.link_free)
        stall = ready - t
        self.stall_s += stall
        self.now = ready
        return stall

    def issue(self, keys: Iterable[ExpertKey]) -> None:
        for key in keys:
            self._queue.append((key, self.now))

    def end_layer(self) -> None:
        self.now += self.layer_s
