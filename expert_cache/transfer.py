"""The transfer engine: copies experts from the slow tier into fast-tier slots off the critical path.

The cache (cache.ExpertCache) decides what to copy and where; this module only moves bytes and
reports when they have landed. It never touches CacheState: every residency change happens on the
thread that runs the model, which polls or waits on the tickets handed out here.

Prefetches wait in a host-side CopyQueue (copy_queue.py) and a worker thread submits them, at
most `copies_in_flight` on the device at once: on CUDA a submitted copy cannot be cancelled, a
waiting one can. A copier does the device-specific part: `_HostCopier` reads into the slot on the
worker thread (CPU fast tier: one read at a time, so the cap is 1), `_CudaCopier` enqueues the
copy on a side stream and brackets it with events (device_timing.EventTimer), so its time is the
copy's, not the launch's.

Invariants (the reason this file exists; everything else is plumbing):
1. A layer may only read a slot after the copy into it completed. On CPU that is the ticket's
   `done` event (set by the worker after the last byte is written); on CUDA it is the event
   recorded on the side stream after the copy (`Ticket.end`), which the compute stream waits on
   (`wait`), so the host never blocks on a GPU copy unless it must.
2. A slot with a copy in flight is never evicted or reused: the cache marks the key in flight in
   CacheState (which refuses to evict it) until it calls `complete` after the ticket is done.
   A cancelled ticket was never submitted, so its slot was never written and can be freed at once.
3. On CUDA, a copy into a slot must not start before earlier kernels that read the slot's
   previous expert finished: every job's side stream waits on the compute stream as it was when
   the job was submitted (`Ticket.after`), and the cache only submits into a slot after evicting
   its old key, which happens after the layers that used it were enqueued.
4. A pinned staging buffer is reused only after the GPU copy out of it completed (its event is
   synchronized before the next read into it).
5. At most `copies_in_flight` prefetch copies are submitted and unfinished; the worker, never the
   model's thread, waits on the device for the oldest when the cap is reached.

Shape legend: I expert intermediate size, D hidden size.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from expert_cache.copy_queue import CopyQueue
from expert_cache.device_timing import EventTimer, HostTimer, device_timer
from expert_cache.policies import ExpertKey
from expert_cache.slow_tier import SlowTier
from moe_rt.errors import MoeRtError


@dataclass(eq=False)
class Ticket:
    """One expert copy. States: queued -> started (submitted) -> done, or queued -> cancelled."""

    key: ExpertKey
    w13: torch.Tensor  # destination slot [2I, D]
    w2: torch.Tensor  # destination slot [D, I]
    prefetch: bool
    started: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    seconds: float = 0.0  # the copy's time, once measured (host_s + the device's time)
    host_s: float = 0.0  # host time reading into pinned staging before a GPU copy (disk tier)
    start: object = None  # timer marks around the copy (device_timing): a float or an event
    end: object = None  # on CUDA also what the compute stream waits on (invariant 1)
    after: object = None  # CUDA: compute-stream position at submit (invariant 3)
    done: threading.Event = field(default_factory=threading.Event)

    def is_done(self) -> bool:
        """Written (CPU), or enqueued on the side stream (CUDA: `wait` orders the reader)."""
        return self.done.is_set()


class TransferEngine:
    """A bounded host queue of expert copies served by one background worker thread.

    Demand loads (misses) are run on the caller's thread with `load_now`: they must not wait
    behind prefetches. Torch copies and os.preadv release the GIL, so the worker overlaps with
    the model's compute on the caller's thread.
    """

    def __init__(self, tier: SlowTier, device: torch.device, max_queued: int = 64, *,
                 copies_in_flight: int = 2, timer: HostTimer | EventTimer | None = None,
                 copier=None) -> None:
        """copier: injected by tests (the device part, see _HostCopier); timer: the cache's."""
        self.tier, self.device = tier, device
        self.max_queued = max_queued
        self.cuda = device.type == "cuda"
        self.timer = timer if timer is not None else device_timer(device)
        if copier is None:
            copier = _CudaCopier(tier, device, self.timer) if self.cuda else _HostCopier(tier, self.timer)
        self._copier = copier
        self._copies: CopyQueue[Ticket] = CopyQueue(copies_in_flight if copier.asynchronous else 1, max_queued)
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="expert-transfer", daemon=True)
        self._worker.start()

    # -- check/action ---------------------------------------------------------------------------
    def room(self) -> int:
        """How many more copies `submit` accepts now (0 once closed). The worker only ever
        shrinks the queue, so this many submits from the caller's thread cannot fail."""
        with self._cv:
            return 0 if self._closed else self._copies.room()

    def can_submit(self) -> bool:
        return self.room() > 0

    def submit(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> Ticket:
        """Queue a prefetch copy into (w13, w2). The caller has marked the key in flight."""
        ticket = Ticket(key, w13, w2, prefetch=True)
        with self._cv:
            if self._closed or self._copies.room() <= 0:
                raise MoeRtError("transfer queue is full or closed (check room first)")
            self._copier.before_submit(ticket)
            self._copies.push(ticket)
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Cancel a copy still waiting in the host queue; False if it was submitted (then it will
        complete)."""
        with self._cv:
            if ticket.started or ticket.is_done() or not self._copies.cancel(ticket):
                return False
            ticket.cancelled = True
            ticket.done.set()
            return True

    def load_now(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> Ticket:
        """Copy on the caller's thread (a demand load). On CUDA the copy is ordered on the
        current stream, so the layer that follows reads it without a host sync."""
        ticket = Ticket(key, w13, w2, prefetch=False, started=True)
        self._copier.load_now(ticket)
        ticket.done.set()
        return ticket

    def wait(self, ticket: Ticket) -> None:
        """Block until `ticket`'s bytes may be read by the next kernel (invariant 1)."""
        ticket.done.wait()
        if ticket.error is not None:
            raise MoeRtError(f"loading expert {ticket.key} failed: {ticket.error}") from ticket.error
        if not ticket.cancelled:
            self._copier.order(ticket)

    def landed(self, ticket: Ticket) -> bool:
        """Whether `ticket` is over: cancelled, failed, or its bytes are in the slot (on CUDA the
        copy finished on the device; asked without blocking)."""
        if not ticket.is_done():
            return False
        return ticket.cancelled or ticket.error is not None or self._copier.finished(ticket, wait=False)

    def queued(self) -> int:
        """Copies waiting in the host queue (cancellable)."""
        with self._cv:
            return len(self._copies.queued)

    def pending(self) -> int:
        """Copies not finished: waiting, or submitted and not finished on the device (asked
        without blocking). What the cost rule counts as the reads ahead of a new prefetch."""
        with self._cv:
            self._retire_finished()
            return self._copies.pending()

    def close(self) -> None:
        """Cancel what is queued, let submitted copies finish, stop the worker."""
        with self._cv:
            self._closed = True
            for t in self._copies.drain():
                t.cancelled = True
                t.done.set()
            self._cv.notify_all()
        self._worker.join()

    # -- the worker -----------------------------------------------------------------------------
    def _retire_finished(self) -> None:
        """Under the lock: free the cap's places of copies the device has finished (query only).
        A ticket not done is still being read or enqueued by the worker, which retires it itself
        if it was synchronous or failed."""
        for t in list(self._copies.submitted):
            if t.is_done() and self._copier.finished(t, wait=False):
                self._copies.retire(t)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._copies.queued and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                self._retire_finished()
                ticket = oldest = None
                if self._copies.can_submit():
                    ticket = self._copies.submit_next()
                    ticket.started = True  # from here cancel() refuses: the slot is being written
                else:
                    oldest = self._copies.oldest_submitted()
            if oldest is not None:  # invariant 5: at the cap, wait here for the oldest copy
                self._copier.finished(oldest, wait=True)
                with self._cv:
                    self._copies.retire(oldest)
                continue
            try:
                self._copier.copy(ticket)
            except BaseException as e:  # reported to whoever waits on the ticket
                ticket.error = e
            if not self._copier.asynchronous or ticket.error is not None:
                with self._cv:
                    self._copies.retire(ticket)
            ticket.done.set()


class _HostCopier:
    """The slow tier reads straight into the slot on the calling thread (CPU fast tier): the copy
    is finished when the read returns, so host-clock marks time it."""

    asynchronous = False

    def __init__(self, tier: SlowTier, timer) -> None:
        self.tier, self.timer = tier, timer

    def before_submit(self, ticket: Ticket) -> None:
        pass

    def copy(self, ticket: Ticket) -> None:
        ticket.start = self.timer.mark()
        try:
            self.tier.read_into(ticket.key, ticket.w13, ticket.w2)
        finally:
            ticket.end = self.timer.mark()

    load_now = copy

    def finished(self, ticket: Ticket, wait: bool) -> bool:
        return True

    def order(self, ticket: Ticket) -> None:
        pass


class _CudaCopier:
    """Host -> GPU copies: prefetches on a side stream (worker thread), demand loads on the
    caller's current stream, each between two timer events. CUDA only (the cuda-marked tests in
    test_ec_transfer.py run it)."""

    asynchronous = True

    def __init__(self, tier: SlowTier, device: torch.device, timer) -> None:
        self.tier, self.device, self.timer = tier, device, timer
        self._side = torch.cuda.Stream(device=device)
        # One staging pair per thread that reads from disk, so they never share a buffer.
        self._worker_staging, self._demand_staging = _PinnedStaging(), _PinnedStaging()

    def before_submit(self, ticket: Ticket) -> None:
        # invariant 3: the copy starts after the kernels enqueued so far (model thread)
        ticket.after = torch.cuda.current_stream(self.device).record_event()

    def copy(self, ticket: Ticket) -> None:
        src13, src2 = self._stage(ticket, self._worker_staging)
        with torch.cuda.stream(self._side):
            if ticket.after is not None:
                self._side.wait_event(ticket.after)
            self._enqueue(ticket, self._side, src13, src2)
        self._worker_staging.release(ticket.end)

    def load_now(self, ticket: Ticket) -> None:
        src13, src2 = self._stage(ticket, self._demand_staging)
        self._enqueue(ticket, torch.cuda.current_stream(self.device), src13, src2)
        self._demand_staging.release(ticket.end)

    def _enqueue(self, ticket: Ticket, stream, src13: torch.Tensor, src2: torch.Tensor) -> None:
        # The events bracket the copy on its stream: their elapsed time is the copy's, on the link.
        ticket.start = self.timer.mark(stream)
        ticket.w13.copy_(src13, non_blocking=True)
        if ticket.w2 is not None:
            ticket.w2.copy_(src2, non_blocking=True)
        ticket.end = self.timer.mark(stream)

    def _stage(self, ticket: Ticket, staging: "_PinnedStaging") -> tuple[torch.Tensor, torch.Tensor]:
        """Host source tensors for a GPU copy: the host tier's pinned tensors, or a pinned
        staging buffer filled from disk (invariant 4: waits until the buffer is free)."""
        host = self.tier.host_weights(ticket.key)
        if host is not None:
            return host
        t0 = time.perf_counter()
        s13, s2 = staging.acquire(ticket.w13, ticket.w2)
        self.tier.read_into(ticket.key, s13, s2)
        ticket.host_s = time.perf_counter() - t0
        return s13, s2

    def finished(self, ticket: Ticket, wait: bool) -> bool:
        if ticket.end is None:  # failed before it was enqueued
            return True
        if wait:
            ticket.end.synchronize()
        return ticket.end.query()

    def order(self, ticket: Ticket) -> None:
        if ticket.end is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket.end)


class _PinnedStaging:
    """Two pinned host buffers used in turn for disk -> GPU copies (CUDA only; one thread each)."""

    def __init__(self, count: int = 2) -> None:
        self._count = count
        self._bufs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._events: list[object] = []
        self._next = 0
        self._current = -1

    def acquire(self, w13: torch.Tensor, w2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A free pinned pair shaped like the destination slot (allocated on first use; a
        quantized slot is one record, w2 None)."""
        if not self._bufs:
            self._bufs = [(torch.empty(w13.shape, dtype=w13.dtype, pin_memory=True),
                           None if w2 is None else torch.empty(w2.shape, dtype=w2.dtype, pin_memory=True))
                          for _ in range(self._count)]
            self._events = [None] * self._count
        i = self._next
        self._next = (i + 1) % self._count
        if self._events[i] is not None:
            self._events[i].synchronize()  # invariant 4: the last copy out of it has finished
        self._current = i
        return self._bufs[i]

    def release(self, event) -> None:
        if self._current >= 0:
            self._events[self._current] = event
            self._current = -1
