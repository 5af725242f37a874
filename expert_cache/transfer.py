"""The transfer engine: copies experts from the slow tier into fast-tier slots off the critical path.

The cache (cache.ExpertCache) decides what to copy and where; this module only moves bytes and
reports when they have landed. It never touches CacheState: every residency change happens on the
thread that runs the model, which polls or waits on the tickets handed out here.

Invariants (the reason this file exists; everything else is plumbing):
1. A layer may only read a slot after the copy into it completed. On CPU that is the ticket's
   `done` event (set by the worker after the last byte is written); on CUDA it is a CUDA event
   recorded on the side stream after the copy, which the compute stream waits on (`wait`), so
   the host never blocks on a GPU copy unless it must.
2. A slot with a copy in flight is never evicted or reused: the cache marks the key in flight in
   CacheState (which refuses to evict it) until it calls `complete` after the ticket is done.
   A cancelled ticket never started, so its slot was never written and can be freed at once.
3. On CUDA, a copy into a slot must not start before earlier kernels that read the slot's
   previous expert finished: every job's side stream waits on the compute stream as it was when
   the job was submitted (`wait_stream`), and the cache only submits into a slot after evicting
   its old key, which happens after the layers that used it were enqueued.
4. A pinned staging buffer is reused only after the GPU copy out of it completed (its event is
   synchronized before the next read into it).

Shape legend: I expert intermediate size, D hidden size.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from expert_cache.policies import ExpertKey
from expert_cache.slow_tier import SlowTier
from moe_rt.errors import MoeRtError


@dataclass(eq=False)
class Ticket:
    """One expert copy. States: queued -> started -> done, or queued -> cancelled."""

    key: ExpertKey
    w13: torch.Tensor  # destination slot [2I, D]
    w2: torch.Tensor  # destination slot [D, I]
    prefetch: bool
    started: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    seconds: float = 0.0  # time the copy took once started (for lookahead: auto)
    cuda_event: object = None  # torch.cuda.Event recorded after the GPU copy (CUDA only)
    done: threading.Event = field(default_factory=threading.Event)

    def is_done(self) -> bool:
        return self.done.is_set()


class TransferEngine:
    """A bounded queue of expert copies served by one background worker thread.

    Demand loads (misses) are run on the caller's thread with `load_now`: they must not wait
    behind prefetches. Torch copies and os.preadv release the GIL, so the worker overlaps with
    the model's compute on the caller's thread.
    """

    def __init__(self, tier: SlowTier, device: torch.device, max_queued: int = 64) -> None:
        self.tier, self.device = tier, device
        self.max_queued = max_queued
        self.cuda = device.type == "cuda"
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        if self.cuda:
            self._side = torch.cuda.Stream(device=device)
            # One staging pair per thread that reads from disk, so they never share a buffer.
            self._worker_staging, self._demand_staging = _PinnedStaging(), _PinnedStaging()
        self._worker = threading.Thread(target=self._run, name="expert-transfer", daemon=True)
        self._worker.start()

    # -- check/action ---------------------------------------------------------------------------
    def room(self) -> int:
        """How many more copies `submit` accepts now (0 once closed). The worker only ever
        shrinks the queue, so this many submits from the caller's thread cannot fail."""
        with self._cv:
            return 0 if self._closed else self.max_queued - len(self._queue)

    def can_submit(self) -> bool:
        return self.room() > 0

    def submit(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> Ticket:
        """Queue a prefetch copy into (w13, w2). The caller has marked the key in flight."""
        ticket = Ticket(key, w13, w2, prefetch=True)
        with self._cv:
            if self._closed or len(self._queue) >= self.max_queued:
                raise MoeRtError("transfer queue is full or closed (check room first)")
            if self.cuda:  # invariant 3: copies start after the kernels enqueued so far
                ticket.cuda_event = torch.cuda.current_stream(self.device).record_event()
            self._queue.append(ticket)
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Cancel a queued copy; False if it already started (then it will complete)."""
        with self._cv:
            if ticket.started or ticket.is_done():
                return False
            self._queue.remove(ticket)
            ticket.cancelled = True
            ticket.done.set()
            return True

    def load_now(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> Ticket:
        """Copy on the caller's thread (a demand load). On CUDA the copy is ordered on the
        current stream, so the layer that follows reads it without a host sync."""
        ticket = Ticket(key, w13, w2, prefetch=False, started=True)
        t0 = time.perf_counter()
        if self.cuda:
            staging = self._demand_staging
            src13, src2 = self._stage(key, staging, w13, w2)
            w13.copy_(src13, non_blocking=True)
            w2.copy_(src2, non_blocking=True)
            staging.release(torch.cuda.current_stream(self.device).record_event())
        else:
            self.tier.read_into(key, w13, w2)
        ticket.seconds = time.perf_counter() - t0
        ticket.done.set()
        return ticket

    def wait(self, ticket: Ticket) -> None:
        """Block until `ticket`'s bytes may be read by the next kernel (invariant 1)."""
        ticket.done.wait()
        if ticket.error is not None:
            raise MoeRtError(f"loading expert {ticket.key} failed: {ticket.error}") from ticket.error
        if self.cuda and ticket.cuda_event is not None and not ticket.cancelled:
            torch.cuda.current_stream(self.device).wait_event(ticket.cuda_event)

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        """Cancel what is queued, let a running copy finish, stop the worker."""
        with self._cv:
            self._closed = True
            while self._queue:
                t = self._queue.popleft()
                t.cancelled = True
                t.done.set()
            self._cv.notify_all()
        self._worker.join()

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                ticket = self._queue.popleft()
                ticket.started = True  # from here cancel() refuses: the slot is being written
            t0 = time.perf_counter()
            try:
                if self.cuda:
                    self._copy_cuda(ticket)
                else:
                    self.tier.read_into(ticket.key, ticket.w13, ticket.w2)
            except BaseException as e:  # reported to whoever waits on the ticket
                ticket.error = e
            ticket.seconds = time.perf_counter() - t0
            ticket.done.set()

    def _stage(self, key: ExpertKey, staging: "_PinnedStaging", w13: torch.Tensor,
               w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host source tensors for a GPU copy: the host tier's pinned tensors, or a pinned
        staging buffer filled from disk (invariant 4: waits until the buffer is free)."""
        host = self.tier.host_weights(key)
        if host is not None:
            return host
        s13, s2 = staging.acquire(w13, w2)
        self.tier.read_into(key, s13, s2)
        return s13, s2

    def _copy_cuda(self, ticket: Ticket) -> None:
        # CUDA path (cannot be exercised on CPU-only machines; see test_ec_transfer_cuda).
        staging = self._worker_staging
        src13, src2 = self._stage(ticket.key, staging, ticket.w13, ticket.w2)
        after = ticket.cuda_event  # compute-stream position at submit (invariant 3)
        with torch.cuda.stream(self._side):
            if after is not None:
                self._side.wait_event(after)
            ticket.w13.copy_(src13, non_blocking=True)
            ticket.w2.copy_(src2, non_blocking=True)
            event = self._side.record_event()
        staging.release(event)
        ticket.cuda_event = event  # invariant 1: the compute stream waits on this


class _PinnedStaging:
    """Two pinned host buffers used in turn for disk -> GPU copies (CUDA only; one thread each)."""

    def __init__(self, count: int = 2) -> None:
        self._count = count
        self._bufs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._events: list[object] = []
        self._next = 0
        self._current = -1

    def acquire(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A free pinned pair shaped like the destination slot (allocated on first use)."""
        if not self._bufs:
            self._bufs = [(torch.empty(w13.shape, dtype=w13.dtype, pin_memory=True),
                           torch.empty(w2.shape, dtype=w2.dtype, pin_memory=True))
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
