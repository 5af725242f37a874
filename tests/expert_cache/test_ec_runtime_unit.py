"""ExpertCache on a fake slow tier (ec_fakes): never-evict rules, waiting on in-flight copies,
prefetch hits, failed copies, and a kernel slot map that is always CacheState's view."""
import threading

import pytest
import torch

import ec_fakes
from ec_fakes import D, I

from moe_rt.layers.moe.events import Forecast

E, L = 4, 2


def make_cache(slots=2, prefetch=True, **cfg):
    return ec_fakes.make_cache(L, E, slots, prefetch, **cfg)


def ids(*experts):
    return torch.tensor([list(experts)])


def prepare(cache, layer, topk):
    experts = cache.prepare(layer, topk)
    ec_fakes.check_layer(cache, experts, layer, topk)
    return experts


def test_hits_misses_and_bytes_add_up():
    cache, tier, _ = make_cache(slots=2, prefetch=False)
    try:
        for l, topk in [(0, ids(0, 1)), (1, ids(2, 3)), (0, ids(1, 2)), (1, ids(3, 2)), (0, ids(0, 1))]:
            prepare(cache, l, topk)
        s = cache.stats()
        assert s["accesses"] == 10
        # L0: 2 misses | L1: 2 misses | L0: 1 hit, 2 misses (evicts 0, LRU) | L1: 2 hits |
        # L0: 0 misses (evicts 2: 1 is needed), 1 hits
        assert (s["hits"], s["misses"]) == (4, 6)
        assert s["bytes_moved"] == {"disk": 6 * 3 * D * I * 4}
        assert len(tier.reads) == 6
        assert sum(c["misses"] for c in s["per_layer"].values()) == 6
        assert cache.state.is_resident((0, 0)) and not cache.state.is_resident((0, 2))
    finally:
        cache.close()


def test_prefetch_hit_counted_and_no_second_read():
    cache, tier, src = make_cache(slots=2, policy="lru")
    try:
        src.forecast(1, [2, 3])
        prepare(cache, 0, ids(0, 1))  # issues prefetches of (1,2), (1,3)
        topk = ids(2, 3)
        prepare(cache, 1, topk)  # waits for the copies if still landing
        s = cache.stats()
        assert (s["prefetch_hits"], s["hits"], s["misses"]) == (2, 2, 2)
        assert tier.reads.count((1, 2)) == 1 and tier.reads.count((1, 3)) == 1
        assert s["prefetches_issued"] == 2 and s["loads"] == 4
    finally:
        cache.close()


def test_in_flight_and_needed_never_evicted_and_wrong_queued_prefetch_cancelled():
    cache, tier, src = make_cache(slots=2)
    tier.hold = {(1, 0)}
    try:
        src.forecast(1, [0, 1])  # (1,0) nearest/highest first: the worker starts it and blocks
        prepare(cache, 0, ids(0))
        assert tier.entered.wait(timeout=30)
        st = cache.state
        assert st.in_flight() == {(1, 0), (1, 1)}
        assert not st.can_evict((1, 0)) and not st.can_evict((1, 1))
        # Layer 1 runs needing 2 and 3: (1,1) is queued and proven wrong -> cancelled, its slot
        # freed; (1,0) is being written -> stays in flight, its slot is not reused.
        busy_slot = st.slot_of((1, 0))
        topk = ids(2, 3)
        prepare(cache, 1, topk)
        assert st.is_resident((1, 0)) and (1, 0) in st.in_flight()
        assert not st.is_resident((1, 1))
        assert (1, 1) not in tier.reads  # cancelled before it started: no bytes read
        assert st.slot_of((1, 2)) != busy_slot and st.slot_of((1, 3)) != busy_slot
        s = cache.stats()
        assert s["prefetches_cancelled"] == 1 and s["prefetches_proven_wrong"] == 1
        assert s["prefetches_issued"] == 1  # the cancelled one moved nothing
        assert s["streamed_misses"] == 1  # one slot free for two misses: the other is streamed
        # Needed keys of the running layer are protected too.
        assert not st.can_evict((1, 2)) or not st.is_resident((1, 2))
    finally:
        tier.gate.set()
        cache.close()
    assert cache.state.in_flight() == set()


def test_miss_on_in_flight_expert_waits_instead_of_loading_twice():
    cache, tier, src = make_cache(slots=2)
    tier.hold = {(1, 2)}
    src.forecast(1, [2])
    prepare(cache, 0, ids(0))
    assert tier.entered.wait(timeout=30)
    result = {}

    def run_layer():
        result["experts"] = cache.prepare(1, ids(2))

    t = threading.Thread(target=run_layer)
    t.start()
    tier.gate.set()
    t.join(timeout=30)
    try:
        assert not t.is_alive()
        ec_fakes.check_layer(cache, result["experts"], 1, ids(2))
        assert tier.reads.count((1, 2)) == 1
        assert cache.stats()["prefetch_hits"] == 1
    finally:
        cache.close()


def test_prefetch_never_displaces_a_nearer_forecast():
    cache, tier, src = make_cache(slots=1, prefetch_queue=4)
    try:
        src.forecast(1, [0])
        prepare(cache, 0, ids(0))  # prefetches (1,0)
        prepare(cache, 1, ids(0))
        assert cache.state.is_resident((1, 0))
        # A new forecast: (1,0) at distance 1 with more votes; (1,1) may not displace it.
        scores = torch.zeros(E)
        scores[0], scores[1] = 3.0, 1.0
        src.send(1, scores, 1)
        prepare(cache, 0, ids(1))
        assert cache.state.is_resident((1, 0)) and not cache.state.is_resident((1, 1))
    finally:
        cache.close()


def test_pinned_experts_loaded_and_never_evicted():
    cache, tier, _ = make_cache(slots=2, prefetch=False, pinned={0: [3]})
    try:
        for e in range(E):
            prepare(cache, 0, ids(e))
        assert cache.state.is_resident((0, 3)) and not cache.state.can_evict((0, 3))
        assert tier.reads.count((0, 3)) == 1
    finally:
        cache.close()


def test_lookahead_auto_depth_from_measured_times():
    from expert_cache.prefetcher import Prefetcher

    p = Prefetcher(num_layers=8, depth="auto", max_depth=4, limit=8)
    assert p.depth == 1  # nothing measured yet
    p.record_transfer(0.030)
    p.record_layer(0.010, issued=2)  # 2 copies x 30 ms need 60 ms = 6 layers -> capped at 4
    assert p.depth == 4
    q = Prefetcher(num_layers=8, depth="auto", max_depth=4, limit=8)
    q.record_transfer(0.004)
    q.record_layer(0.010, issued=2)  # 8 ms of copies per 10 ms layer -> 1 layer ahead
    assert q.depth == 1
    assert Prefetcher(num_layers=8, depth=3, max_depth=2, limit=8).depth == 2


def test_feed_keeps_only_forecasts_within_depth_and_replaces_rounds():
    from expert_cache.policies import Prediction
    from expert_cache.prefetcher import Prefetcher

    p = Prefetcher(num_layers=4, depth=1, max_depth=2, limit=8)
    p.feed(Forecast(1, torch.tensor([0.0, 2.0, 0.0, 1.0]), 1))
    p.feed(Forecast(2, torch.tensor([1.0, 0.0, 0.0, 0.0]), 2))  # beyond depth 1: ignored
    assert p.predicted == {(1, 1): Prediction(1, 2.0), (1, 3): Prediction(1, 1.0)}
    assert p.candidates({(1, 1)}) == [(1, 3)]
    p.feed(Forecast(2, torch.tensor([0.0, 0.0, 5.0, 0.0]), 1))  # next layer's round replaces
    assert p.predicted == {(2, 2): Prediction(1, 5.0)}


def test_failed_prefetch_frees_its_slot_and_raises():
    from moe_rt.errors import MoeRtError

    cache, tier, src = make_cache(slots=2)
    tier.hold = tier.fail = {(1, 2)}
    try:
        src.forecast(1, [2])
        prepare(cache, 0, ids(0))  # prefetches (1,2)
        assert tier.entered.wait(timeout=30)  # the worker has started it: it cannot be cancelled
        tier.gate.set()  # ... and its read fails
        with pytest.raises(MoeRtError, match=r"loading expert \(1, 2\) failed"):
            cache.prepare(1, ids(2))
        st = cache.state
        st.check_consistent()
        # The slot held partial bytes: freed, its load taken back (not an eviction, not wasted).
        assert not st.is_resident((1, 2)) and st.in_flight() == set() and st.num_free(1) == 2
        s = cache.stats()
        assert (s["prefetches_issued"], s["evictions"], s["wasted_prefetches"]) == (0, 0, 0)
        assert s["bytes_moved"] == {"disk": 1 * 3 * D * I * 4}  # (0,0) only
        tier.fail = set()
        prepare(cache, 1, ids(2))  # the next visit loads it on demand
        assert st.is_resident((1, 2))
    finally:
        tier.gate.set()
        cache.close()


def test_failed_load_of_a_queued_prefetch_frees_its_slot_and_raises():
    cache, tier, src = make_cache(slots=2)
    tier.hold, tier.fail = {(1, 2)}, {(1, 3)}
    try:
        src.forecast(1, [2, 3])
        prepare(cache, 0, ids(0))  # (1,2) holds the worker, (1,3) stays queued
        assert tier.entered.wait(timeout=30)
        # Layer 1 needs (1,3): its queued copy is cancelled and loaded on this thread, which fails.
        with pytest.raises(OSError, match="cannot read"):
            cache.prepare(1, ids(3))
        st = cache.state
        st.check_consistent()
        assert not st.is_resident((1, 3)) and st.in_flight() == {(1, 2)}
        assert cache.stats()["prefetches_issued"] == 1  # (1,2); the aborted (1,3) taken back
    finally:
        tier.gate.set()
        cache.close()


def test_failed_demand_load_frees_its_slot_and_raises():
    cache, tier, _ = make_cache(slots=2, prefetch=False)
    tier.fail = {(0, 1)}
    try:
        with pytest.raises(OSError, match="cannot read"):
            cache.prepare(0, ids(0, 1))
        st = cache.state
        st.check_consistent()
        assert st.is_resident((0, 0)) and not st.is_resident((0, 1)) and st.in_flight() == set()
        assert cache.stats()["bytes_moved"] == {"disk": 1 * 3 * D * I * 4}
        tier.fail = set()
        prepare(cache, 0, ids(0, 1))
        assert st.is_resident((0, 1))
    finally:
        cache.close()
