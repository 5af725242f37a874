"""CacheState transitions, accounting, and the never-evict rules."""
import pytest

from expert_cache.state import CacheState, CacheStateError


def test_per_layer_pools_hand_out_slots_in_order_and_are_independent():
    s = CacheState(num_layers=2, capacity_slots=2, scope="per_layer", expert_bytes=10)
    assert s.admit((0, 5), now=0) == 0
    assert s.admit((0, 7), now=0) == 1
    assert not s.can_admit((0, 1))  # layer 0 full
    assert s.can_admit((1, 1))  # layer 1 has its own slots
    assert s.admit((1, 1), now=0) == 0
    assert not s.can_admit((0, 5))  # already resident
    with pytest.raises(CacheStateError, match="already resident"):
        s.admit((0, 5), now=1)
    with pytest.raises(CacheStateError, match="no free slot"):
        s.admit((0, 1), now=1)
    assert s.stats.bytes_moved == {"cpu": 30}


def test_global_pool_is_shared_across_layers():
    s = CacheState(num_layers=3, capacity_slots=2, scope="global")
    s.admit((0, 0), now=0)
    s.admit((2, 4), now=0)
    assert not s.can_admit((1, 0))
    assert s.pool_of((1, 0)) == s.pool_of((2, 4)) == 0
    assert s.evict((0, 0)) == 0  # slot 0 freed and reused
    assert s.admit((1, 0), now=1) == 0


def test_evict_refuses_pinned_in_flight_needed_and_absent():
    s = CacheState(num_layers=1, capacity_slots=4)
    s.pin((0, 0))
    s.admit((0, 1), now=0, in_flight=True)
    s.admit((0, 2), now=0)
    s.admit((0, 3), now=0)
    s.mark_needed([(0, 2)])
    for key, why in [((0, 0), "pinned"), ((0, 1), "in flight"), ((0, 2), "needed"),
                     ((0, 9), "not resident")]:
        assert not s.can_evict(key)
        with pytest.raises(CacheStateError, match=why):
            s.evict(key)
    assert s.candidates(0) == {(0, 3)}
    s.complete((0, 1))
    s.clear_needed()
    assert s.candidates(0) == {(0, 1), (0, 2), (0, 3)}
    s.evict((0, 1))
    assert (0, 1) not in s.entries and s.num_free(0) == 1


def test_in_flight_pair_checks():
    s = CacheState(num_layers=1, capacity_slots=1)
    with pytest.raises(CacheStateError, match="not resident"):
        s.mark_in_flight((0, 0))
    s.admit((0, 0), now=0)
    s.mark_in_flight((0, 0))
    with pytest.raises(CacheStateError, match="already in flight"):
        s.mark_in_flight((0, 0))
    s.complete((0, 0))
    with pytest.raises(CacheStateError, match="not in flight"):
        s.complete((0, 0))


def test_pin_admits_when_needed_and_refuses_when_full():
    s = CacheState(num_layers=1, capacity_slots=1)
    assert s.pin((0, 3)) == 0
    assert s.entries[(0, 3)].pinned
    assert s.pinned() == {(0, 3)}
    assert not s.can_pin((0, 4))
    with pytest.raises(CacheStateError):
        s.pin((0, 4))
    assert s.candidates(0) == set()


def test_access_counts_hits_misses_prefetch_hits_and_wasted_prefetch_bytes():
    s = CacheState(num_layers=1, capacity_slots=3, expert_bytes=100, source_tier="disk")
    s.admit((0, 0), now=0, prefetch=True)
    s.admit((0, 1), now=0, prefetch=True)
    assert s.access((0, 0), now=1) == "prefetch_hit"
    assert s.access((0, 0), now=2) == "hit"  # only the first hit counts as a prefetch hit
    assert s.access((0, 5), now=3) == "miss"
    s.evict((0, 1))  # prefetched, never hit: wasted
    s.evict((0, 0))  # prefetched and hit: not wasted
    st = s.stats
    assert (st.hits, st.misses, st.prefetch_hits, st.prefetches_issued) == (2, 1, 1, 2)
    assert (st.wasted_prefetches, st.wasted_prefetch_bytes, st.evictions) == (1, 100, 2)
    assert st.loads == 3 and st.accesses == 3
    assert st.hit_rate == pytest.approx(2 / 3)
    assert st.bytes_moved == {"disk": 200}
    assert s.use_count == {(0, 0): 2, (0, 5): 1}
    assert s.last_use[(0, 5)] == 3
    s.record_streamed((0, 5))
    assert st.streamed_misses == 1 and st.bytes_moved == {"disk": 300}


def test_key_history_survives_eviction():
    s = CacheState(num_layers=1, capacity_slots=1)
    s.admit((0, 2), now=0)
    s.access((0, 2), now=1)
    s.evict((0, 2))
    assert s.use_count[(0, 2)] == 1 and s.load_count[(0, 2)] == 1
    inputs = s.policy_inputs()
    assert inputs.use_count is s.use_count  # shared, not copied


def test_bad_construction_and_out_of_range_layer():
    with pytest.raises(ValueError):
        CacheState(num_layers=0, capacity_slots=1)
    with pytest.raises(ValueError):
        CacheState(num_layers=1, capacity_slots=1, scope="rack")
    s = CacheState(num_layers=2, capacity_slots=1)
    with pytest.raises(CacheStateError, match="outside"):
        s.can_admit((2, 0))


def test_abort_load_frees_the_slot_and_takes_the_load_back():
    s = CacheState(num_layers=2, capacity_slots=2, expert_bytes=10, source_tier="disk")
    s.admit((1, 3), now=0, prefetch=True, in_flight=True)
    s.admit((1, 2), now=0)
    assert s.slot_map(1, 4) == [-1, -1, 1, 0]
    with pytest.raises(CacheStateError, match="not in flight"):
        s.abort_load((1, 2))
    assert s.abort_load((1, 3)) == 0
    st = s.stats
    assert (st.prefetches_issued, st.evictions, st.wasted_prefetches) == (0, 0, 0)
    assert st.bytes_moved == {"disk": 10} and s.load_count[(1, 3)] == 0
    assert s.slot_map(1, 4) == [-1, -1, 1, -1] and s.in_flight() == set()
    assert s.admit((1, 0), now=1) == 0  # the slot is free again
    s.check_consistent()


def test_check_consistent_catches_an_index_edited_behind_the_state():
    s = CacheState(num_layers=1, capacity_slots=2)
    s.admit((0, 1), now=0)
    s.check_consistent()
    s.layer_slots[0][1] = 1  # a second record drifting from entries
    with pytest.raises(CacheStateError, match="layer_slots"):
        s.check_consistent()
