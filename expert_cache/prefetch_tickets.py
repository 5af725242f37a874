"""The cache's prefetches in flight: one transfer Ticket per key from issue until the copy has
landed, been cancelled, or failed, and what happened to them (cancelled, proven wrong).

Invariant: a key with a ticket here is in flight in CacheState, so no one evicts it or hands its
slot to another key while the transfer worker writes into it; every way out of here (finish,
abort) clears that mark. All calls come from the model's thread; the transfer worker only
writes bytes.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from expert_cache.planning import demand_shortfall, prefetches_to_drop, prefetches_to_reclaim
from expert_cache.policies import ExpertKey
from expert_cache.state import CacheState
from expert_cache.transfer import Ticket, TransferEngine
from moe_rt.errors import MoeRtError


class PrefetchTickets:
    def __init__(self, state: CacheState, transfer: TransferEngine,
                 time_copy: Callable[[Ticket], None]) -> None:
        """time_copy: folds a landed prefetch's copy time into the cache's measurements."""
        self.state, self.transfer, self._time_copy = state, transfer, time_copy
        self._tickets: dict[ExpertKey, Ticket] = {}  # in-flight prefetches
        self.cancelled = 0  # prefetches cancelled before they were submitted (moved no bytes)
        # ... by reason: its layer ran without it, its forecast was withdrawn, a miss took its slot
        self.cancelled_by = {"wrong": 0, "withdrawn": 0, "demand": 0}
        self.proven_wrong = 0  # prefetches already copying when their layer ran without them

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, key: ExpertKey, ticket: Ticket) -> None:
        """A prefetch of `key` was submitted (key already in flight in CacheState)."""
        self._tickets[key] = ticket

    def settle(self) -> None:
        """Wait for every issued prefetch to land and account it."""
        for key, ticket in list(self._tickets.items()):
            self._finish(key, ticket)

    def reap(self) -> None:
        """Complete the prefetches that have landed (on CUDA: whose copy the device finished, so
        the compute stream is never made to wait for a copy a later layer needs)."""
        for key, ticket in list(self._tickets.items()):
            if self.transfer.landed(ticket):
                self._finish(key, ticket)

    def land(self, keys: list[ExpertKey]) -> float:
        """Wait for the prefetches of `keys` still landing; a queued one is loaded now instead of
        after the queue (never two loads of one expert). Returns the seconds waited."""
        t0, waited = time.perf_counter(), False
        for key in keys:
            ticket = self._tickets.get(key)
            if ticket is None:
                continue
            waited = True
            if self.transfer.cancel(ticket):  # not started: load it on this thread
                try:
                    self.transfer.load_now(key, ticket.w13, ticket.w2)
                except BaseException:
                    self._abort(key)
                    raise
            self._finish(key, ticket)
        return time.perf_counter() - t0 if waited else 0.0

    def _finish(self, key: ExpertKey, ticket: Ticket) -> None:
        """The copy has landed (or was cancelled and loaded by land, or cancelled by close): the
        key stops being in flight. A failed copy leaves partial bytes: its slot is freed and the
        error raised."""
        del self._tickets[key]
        try:
            self.transfer.wait(ticket)  # raises if the read failed; on CUDA orders the compute stream
        except MoeRtError:
            self.state.abort_load(key)
            raise
        self.state.complete(key)
        if ticket.prefetch and not ticket.cancelled:
            self._time_copy(ticket)

    def _abort(self, key: ExpertKey) -> None:
        """The copy into key's slot never happened: free the slot, take back the load's counts."""
        del self._tickets[key]
        self.state.abort_load(key)

    def _queued_keys(self) -> list[ExpertKey]:
        """Prefetches still in the host queue (not submitted: cancellable), in issue order."""
        return [k for k, t in self._tickets.items() if not t.started and not t.is_done()]

    def _cancel(self, key: ExpertKey, reason: str) -> bool:
        """Cancel key's queued copy (its slot was never written: no bytes counted, not an
        eviction nor a wasted prefetch); False if the worker submitted it meanwhile."""
        if not self.transfer.cancel(self._tickets[key]):
            return False
        self._abort(key)
        self.cancelled += 1
        self.cancelled_by[reason] += 1
        return True

    def drop(self, layer: int, used: list[ExpertKey], predicted) -> None:
        """Layer `layer` is about to run with `used`: cancel queued prefetches it proves wrong or
        whose forecast was withdrawn (planning.prefetches_to_drop); count submitted ones of
        `layer` it does not use as proven wrong (they land and may be wasted)."""
        wrong, withdrawn = prefetches_to_drop(self._queued_keys(), layer, used, predicted)
        for key in wrong:
            self._cancel(key, "wrong")
        for key in withdrawn:
            self._cancel(key, "withdrawn")
        needed = set(used)
        self.proven_wrong += sum(k[0] == layer and k not in needed for k in self._tickets)

    def reclaim(self, keys: list[ExpertKey], skip: list[ExpertKey]) -> None:
        """A miss with no slot left would be streamed: cancel queued prefetches of its pool to
        free theirs first (planning.demand_shortfall, prefetches_to_reclaim)."""
        if not self._tickets:
            return
        short = demand_shortfall(self.state, keys, skip)
        if short:
            for key in prefetches_to_reclaim(self._queued_keys(), short, self.state.pool_of):
                self._cancel(key, "demand")
