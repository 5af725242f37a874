"""How long work took on the device that ran it: the host clock on the CPU, CUDA events on a GPU.

On CUDA a copy or a kernel call returns once the work is enqueued (microseconds), so the host
clock around it measures launch time, not the work. An EventTimer records an event on the stream
that runs the work before and after it (`mark`), and hands the elapsed time to whoever asked
(`measure`'s callback) once both events have completed. Completion is found by `poll`, which only
queries events: the model's thread never blocks on the device to take a measurement (invariant).
Only `poll(wait=True)`, for reports (stats) and never in a layer, synchronizes.

On the CPU the work is done when the call returns, so the host clock is the measure and the
callback runs at once (HostTimer): the cache's CPU timings are what they always were.

Marks are opaque: a float (perf_counter) from HostTimer, an event from EventTimer. A measurement
pairs two marks of the same timer.
"""
from __future__ import annotations

import collections
import time
from typing import Callable

Done = Callable[[float], None]  # receives the measured seconds


class HostTimer:
    deferred = False  # measurements are complete when `measure` is called

    def mark(self, stream=None) -> float:
        return time.perf_counter()

    def measure(self, start: float, end: float, done: Done) -> None:
        done(end - start)

    def poll(self, wait: bool = False) -> int:
        return 0

    def pending(self) -> int:
        return 0


class EventTimer:
    """Device timing with events. `new_event()` makes an event with timing enabled (injected, so
    the bookkeeping is tested on the CPU with fake events): `record(stream)`, `query()`,
    `synchronize()` and `elapsed_time(end)` in milliseconds, as torch.cuda.Event has."""

    deferred = True  # measurements complete later; `poll` folds them

    def __init__(self, new_event: Callable[[], object]) -> None:
        self._new_event = new_event
        self._pending: collections.deque[tuple[object, object, Done]] = collections.deque()

    def mark(self, stream=None):
        """An event recorded on `stream` (None: the current stream): it completes when the device
        reaches this point of the stream."""
        event = self._new_event()
        event.record(stream)
        return event

    def measure(self, start, end, done: Done) -> None:
        self._pending.append((start, end, done))

    def poll(self, wait: bool = False) -> int:
        """Hand every completed measurement to its callback, in the order they were asked for
        among those completed; the rest stay pending (marks on different streams complete out of
        order). wait: synchronize on each first (reports only). Returns how many were handed."""
        kept: collections.deque = collections.deque()
        handed = 0
        while self._pending:
            start, end, done = self._pending.popleft()
            if wait:
                end.synchronize()
            if end.query() and start.query():
                done(start.elapsed_time(end) / 1000.0)
                handed += 1
            else:
                kept.append((start, end, done))
        self._pending = kept
        return handed

    def pending(self) -> int:
        return len(self._pending)


def device_timer(device) -> HostTimer | EventTimer:
    """The timer for work on `device` (a torch.device)."""
    if device.type != "cuda":
        return HostTimer()
    import torch

    return EventTimer(lambda: torch.cuda.Event(enable_timing=True))
