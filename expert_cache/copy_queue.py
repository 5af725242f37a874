"""Prefetch copies waiting on the host, and how many of them the device holds at once.

A copy submitted to a CUDA stream cannot be taken back; one still waiting here can. So the
transfer engine keeps prefetches in this queue and submits at most `cap` at a time
(CacheConfig.copies_in_flight): enough to keep the link busy, few enough that a prefetch whose
forecast is withdrawn, whose layer runs without it, or whose slot a demand load needs is usually
still waiting, and is dropped without moving a byte (the decisions: planning.prefetches_to_drop,
planning.prefetches_to_reclaim).

Pure bookkeeping, no threads or devices: the engine calls it under its lock, and tells it when
the device has finished a submitted copy (`retire`). Items are compared by identity.
"""
from __future__ import annotations

import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class CopyQueue(Generic[T]):
    def __init__(self, cap: int, max_queued: int) -> None:
        """cap: most copies submitted and not finished; max_queued: most copies waiting."""
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.cap, self.max_queued = cap, max_queued
        self.queued: collections.deque[T] = collections.deque()  # waiting, in submission order
        self.submitted: list[T] = []  # on the device, oldest first

    def room(self) -> int:
        """How many more copies `push` accepts."""
        return self.max_queued - len(self.queued)

    def push(self, item: T) -> None:
        if self.room() <= 0:
            raise ValueError("copy queue is full")
        self.queued.append(item)

    def can_submit(self) -> bool:
        return bool(self.queued) and len(self.submitted) < self.cap

    def submit_next(self) -> T:
        """The oldest waiting copy, now counted as on the device (no longer cancellable)."""
        if not self.can_submit():
            raise ValueError("nothing to submit, or cap reached")
        item = self.queued.popleft()
        self.submitted.append(item)
        return item

    def oldest_submitted(self) -> T:
        return self.submitted[0]

    def retire(self, item: T) -> None:
        """The device finished `item`: its place under the cap is free."""
        for i, x in enumerate(self.submitted):
            if x is item:
                del self.submitted[i]
                return
        raise ValueError("retiring a copy that was not submitted")

    def cancel(self, item: T) -> bool:
        """Drop a waiting copy; False if it was submitted already (it will complete)."""
        for i, x in enumerate(self.queued):
            if x is item:
                del self.queued[i]
                return True
        return False

    def pending(self) -> int:
        """Copies not finished: waiting plus on the device."""
        return len(self.queued) + len(self.submitted)

    def drain(self) -> list[T]:
        """Remove and return every waiting copy (closing)."""
        out = list(self.queued)
        self.queued.clear()
        return out
