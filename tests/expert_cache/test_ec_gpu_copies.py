"""GPU copies, checked on the CPU where the behaviour does not depend on the device: device timings
folded in only once their events completed (fake events, never a wait in a layer); at most
`copies_in_flight` copies submitted, the rest cancellable (a fake asynchronous copier); which
queued prefetches are dropped (exact outputs) and the cache dropping them. The CUDA parts run in
the cuda-marked tests at the end."""
import threading

import pytest
import torch

import ec_fakes
from expert_cache.copy_queue import CopyQueue
from expert_cache.device_timing import EventTimer, HostTimer
from expert_cache.planning import demand_shortfall, prefetches_to_drop, prefetches_to_reclaim
from expert_cache.policies import Prediction
from expert_cache.state import CacheState
from expert_cache.transfer import TransferEngine


class FakeDevice:
    """A device clock: each recorded event takes the next second; events complete when told."""

    def __init__(self):
        self.t, self.events, self.syncs = 0.0, [], 0
        self.lock = threading.Lock()

    def event(self):
        return FakeEvent(self)

    def complete_all(self):
        for e in self.events:
            e.complete = True


class FakeEvent:
    def __init__(self, dev):
        self.dev, self.t, self.complete = dev, None, False

    def record(self, stream=None):
        with self.dev.lock:
            self.dev.t += 1.0
            self.t = self.dev.t
            self.dev.events.append(self)

    def query(self):
        return self.complete

    def synchronize(self):
        self.dev.syncs += 1
        self.complete = True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0  # milliseconds, as torch.cuda.Event


# -- device timing -----------------------------------------------------------------------------------
def test_event_timings_are_folded_only_once_completed_in_completion_order():
    dev = FakeDevice()
    timer, got = EventTimer(dev.event), []
    a, b = timer.mark(), timer.mark()
    c, d = timer.mark(), timer.mark()
    timer.measure(a, d, lambda s: got.append(("ad", s)))
    timer.measure(b, c, lambda s: got.append(("bc", s)))
    assert timer.poll() == 0 and got == [] and timer.pending() == 2
    b.complete = c.complete = True  # the second measurement completes first
    assert timer.poll() == 1 and got == [("bc", 1.0)]
    a.complete = True
    assert timer.poll() == 0  # d not reached yet
    assert dev.syncs == 0  # poll only queries
    assert timer.poll(wait=True) == 1 and got[-1] == ("ad", 3.0) and timer.pending() == 0


def test_host_timer_measures_at_once():
    timer, got = HostTimer(), []
    timer.measure(1.0, 3.5, got.append)
    assert got == [2.5] and not timer.deferred and timer.poll() == 0


# -- the copy queue and the cap ------------------------------------------------------------------------
def test_copy_queue_caps_submitted_copies_and_cancels_only_waiting_ones():
    q = CopyQueue(cap=2, max_queued=3)
    a, b, c, d = object(), object(), object(), object()
    for x in (a, b, c):
        q.push(x)
    with pytest.raises(ValueError, match="full"):
        q.push(d)
    assert q.submit_next() is a and q.submit_next() is b
    assert not q.can_submit() and q.pending() == 3 and q.oldest_submitted() is a
    assert not q.cancel(a)  # on the device: cannot be taken back
    q.push(d)
    assert q.cancel(d) and list(q.queued) == [c]
    q.retire(a)
    assert q.can_submit() and q.submit_next() is c and q.submitted == [b, c]
    with pytest.raises(ValueError):
        CopyQueue(cap=0, max_queued=1)


class FakeAsyncCopier:
    """Copies 'submitted to a stream': each finishes when its gate is set. `finished(wait=True)`
    (the worker at the cap) says so through `at_cap`, then blocks on the gate."""

    asynchronous = True

    def __init__(self):
        self.submitted, self.gates, self.at_cap = [], {}, threading.Event()

    def gate(self, key):
        return self.gates.setdefault(key, threading.Event())

    def before_submit(self, ticket):
        self.gate(ticket.key)

    def copy(self, ticket):
        self.submitted.append(ticket.key)
        ticket.w13.fill_(ticket.key[1])

    load_now = copy

    def finished(self, ticket, wait):
        if wait:
            self.at_cap.set()
            assert self.gate(ticket.key).wait(timeout=30), "test never finished the copy"
        return self.gate(ticket.key).is_set()

    def order(self, ticket):
        pass


def test_at_most_copies_in_flight_are_submitted_and_the_rest_can_be_cancelled():
    copier = FakeAsyncCopier()
    eng = TransferEngine(None, torch.device("cpu"), max_queued=8, copies_in_flight=2, copier=copier)
    w13 = torch.zeros(4, 2)
    try:
        tickets = [eng.submit((0, e), w13[e], None) for e in range(4)]
        assert copier.at_cap.wait(timeout=30)  # two on the "device", the worker waits for the oldest
        assert copier.submitted == [(0, 0), (0, 1)] and eng.queued() == 2 and eng.pending() == 4
        assert not eng.cancel(tickets[0])
        assert eng.cancel(tickets[3]) and tickets[3].cancelled and eng.pending() == 3
        copier.gate((0, 0)).set()  # the oldest finishes: the next one goes
        assert tickets[2].done.wait(timeout=30)
        assert copier.submitted == [(0, 0), (0, 1), (0, 2)]
        assert eng.landed(tickets[0]) and not eng.landed(tickets[1]) and eng.landed(tickets[3])
        for g in copier.gates.values():
            g.set()
    finally:
        for g in copier.gates.values():
            g.set()
        eng.close()
    assert w13[:, 0].tolist() == [0, 1, 2, 0]  # the cancelled copy never wrote its slot


# -- which queued prefetches to drop (pure) --------------------------------------------------------
def test_prefetches_to_drop_exact():
    queued = [(2, 0), (3, 1), (2, 5), (4, 2)]
    forecast = {(3, 1): Prediction(1, 2.0), (4, 9): Prediction(2, 1.0)}
    assert prefetches_to_drop(queued, 2, [(2, 5), (2, 7)], forecast) == ([(2, 0)], [(4, 2)])
    assert prefetches_to_drop(queued, 2, [], None) == ([(2, 0), (2, 5)], [])  # no forecast: nothing withdrawn


def test_demand_shortfall_and_reclaim_exact():
    st = CacheState(num_layers=3, capacity_slots=3, scope="global")
    st.admit((0, 0), now=1)
    st.admit((2, 1), now=1, prefetch=True, in_flight=True)
    st.admit((2, 2), now=1, prefetch=True, in_flight=True)
    keys = [(1, 0), (1, 1), (1, 2), (0, 0)]
    st.mark_needed(keys)
    # three misses, no free slot, no candidate ((0,0) is needed, the rest in flight); one skipped
    assert demand_shortfall(st, keys) == {0: 3}
    assert demand_shortfall(st, keys, skip=[(1, 2)]) == {0: 2}
    st.clear_needed()
    st.mark_needed(keys[:3])
    assert demand_shortfall(st, keys[:3]) == {0: 2}  # (0,0) may be evicted now
    # latest queued first, only from pools short of slots, at most the shortfall each
    pool = lambda k: k[0] % 2  # noqa: E731  (two pools for the test)
    assert prefetches_to_reclaim([(2, 1), (2, 2), (1, 3), (3, 0)], {0: 1, 1: 5}, pool) == [(3, 0), (1, 3), (2, 2)]
    assert prefetches_to_reclaim([(2, 1)], {}, pool) == []


def test_link_clock_drops_withdrawn_prefetches_as_the_runtime_does():
    from expert_cache.link_clock import LinkClock

    def queued_after(forecast):
        clock = LinkClock(read_s=2.0, layer_s=1.0)
        clock.begin_layer(0, [(0, 0)], 0)
        clock.issue([(1, 0), (2, 0), (2, 1)])  # (1,0) starts at once, the others wait
        clock.end_layer()
        assert clock.begin_layer(1, [(1, 0)], 0, forecast) == 1.0  # (1,0) lands at 2
        return clock.queued()

    assert queued_after(None) == 2
    assert queued_after({(2, 0): Prediction(1, 1.0)}) == 1  # (2,1) withdrawn, never read


# -- the cache cancelling queued prefetches ---------------------------------------------------------
def ids(*experts):
    return torch.tensor([list(experts)])


def test_cache_cancels_a_withdrawn_prefetch_before_it_moves_a_byte():
    cache, tier, src = ec_fakes.make_cache(3, 4, 2, depth=2)
    tier.hold = {(1, 0)}
    try:
        src.forecast(1, [0], d=1)
        src.forecast(2, [1], d=2)
        cache.prepare(0, ids(0))  # (1,0) starts and holds the worker, (2,1) waits in the queue
        assert tier.entered.wait(timeout=30)
        src.forecast(2, [3], d=1)  # the next round no longer names (2,1)
        cache.prepare(1, ids(2))
        s = cache.stats()
        assert s["prefetches_cancelled_by"] == {"wrong": 0, "withdrawn": 1, "demand": 0}
        assert s["prefetches_cancelled"] == 1 and s["prefetches_proven_wrong"] == 1  # (1,0): submitted
        assert (2, 1) not in tier.reads and not cache.state.is_resident((2, 1))
        cache.state.check_consistent()
    finally:
        tier.gate.set()
        cache.close()


def test_cache_takes_a_queued_prefetchs_slot_for_a_miss_instead_of_streaming():
    cache, tier, src = ec_fakes.make_cache(3, 4, 3, depth=2, scope="global")
    tier.hold = {(1, 0)}
    try:
        src.forecast(1, [0], d=1)
        src.forecast(2, [1], d=2)
        cache.prepare(0, ids(0))  # slots: (0,0), (1,0) copying, (2,1) queued
        assert tier.entered.wait(timeout=30)
        src.forecast(2, [1], d=1)  # still forecast: not withdrawn
        experts = cache.prepare(1, ids(1, 2))  # two misses, one evictable slot: (2,1) gives its own
        ec_fakes.check_layer(cache, experts, 1, ids(1, 2))
        s = cache.stats()
        assert s["prefetches_cancelled_by"] == {"wrong": 0, "withdrawn": 0, "demand": 1}
        assert s["streamed_misses"] == 0 and s["misses"] == 3
        assert (2, 1) not in tier.reads
    finally:
        tier.gate.set()
        cache.close()


def test_cache_folds_device_timings_when_they_complete_and_never_waits_in_a_layer():
    dev = FakeDevice()
    cache, tier, src = ec_fakes.make_cache(2, 4, 2, timer=EventTimer(dev.event))
    try:
        src.forecast(1, [2])
        cache.prepare(0, ids(0))  # a demand copy and a prefetch, each between two events
        cache.prepare(1, ids(2, 3))
        p = cache.prefetcher
        assert dev.syncs == 0  # prepare only queried events
        assert p.transfer_s.value is None and p.layer_s.value is None and cache.state.stats.stall_s == 0
        dev.complete_all()
        cache.prepare(0, ids(0))  # folds what completed
        assert dev.syncs == 0
        assert p.transfer_s.value > 0 and p.layer_s.value > 0 and cache.state.stats.stall_s > 0
    finally:
        cache.close()


# -- CUDA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("copies_in_flight", [1, 3])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copies_under_the_cap_land_and_are_timed_by_events(copies_in_flight):
    from expert_cache.slow_tier import HostTier

    from test_ec_transfer import _Reader, _spec

    tier = HostTier(_Reader(), _spec(), torch.float32, pin=True)
    eng = TransferEngine(tier, torch.device("cuda"), copies_in_flight=copies_in_flight)
    w13, w2 = torch.zeros(3, 12, 4, device="cuda"), torch.zeros(3, 4, 6, device="cuda")
    try:
        tickets = [eng.submit((1, e), w13[e], w2[e]) for e in range(3)]
        for t in tickets:
            eng.wait(t)
        got = []
        for t in tickets:
            eng.timer.measure(t.start, t.end, got.append)
        eng.timer.poll(wait=True)
        assert len(got) == 3 and all(s > 0 for s in got)
        assert [w13[e].eq(10 + e).all().item() for e in range(3)] == [True] * 3
        assert w2[2].eq(12).all().item()
    finally:
        eng.close()
        tier.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_cache_equals_resident_with_device_timings(mixtral_dir):
    from test_ec_host_compute import run

    want, _ = run(mixtral_dir, dict(offload="cpu", capacity_slots=8), device="cuda")  # every expert fits
    got, s = run(mixtral_dir, dict(offload="cpu", capacity_slots=2, policy="predictive", predictor="gate_lookahead",
                                   lookahead="auto", copies_in_flight=1), device="cuda")
    assert got == want
    assert s["transfer_s_avg"] > 0 and s["layer_s_avg"] > 0 and s["link_bytes_per_s"] > 0
    assert s["copies_in_flight"] == 1 and s["stall_s"] >= 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ids_read_once_and_slot_maps_sent_without_a_wait():
    from expert_cache.device_io import ids_on_host, slot_map, used_experts

    ids = torch.tensor([[3, -1], [0, 3]], device="cuda")
    host = ids_on_host(ids)
    assert host.device.type == "cpu" and host.is_pinned() and used_experts(host) == [0, 3]
    m = slot_map([1, -1, 0], torch.device("cuda"))
    assert m.is_cuda and m.tolist() == [1, -1, 0]


def test_pending_while_a_read_is_in_progress_keeps_the_worker_alive():
    """Asking how many copies are pending while the worker is inside a read must not retire that
    read early (the worker retires it when the read returns)."""
    tier = ec_fakes.FakeTier()
    tier.hold = {(0, 0)}
    eng = TransferEngine(tier, torch.device("cpu"), max_queued=4)
    w13, w2 = torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)
    try:
        a = eng.submit((0, 0), w13[0], w2[0])
        assert tier.entered.wait(timeout=30)
        assert eng.pending() == 1  # being read
        b = eng.submit((0, 1), w13[1], w2[1])
        assert eng.pending() == 2
        tier.gate.set()
        eng.wait(a)
        eng.wait(b)
        assert eng.pending() == 0 and w13[1].eq(1).all()
    finally:
        tier.gate.set()
        eng.close()
