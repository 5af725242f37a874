"""Expert bits plans through the offloading cache: each expert cached, moved and computed at its
own width. The cached model computes exactly what the all-resident model with the same plan
computes (logits bit for bit), each load moves its width's real bytes, and width pools never
give one width's slots to another."""
import pytest
import torch

from checkpoints import write_checkpoint
from expert_cache.config import CacheConfig
from expert_cache.planning import plan_demand
from expert_cache.state import CacheState, CacheStateError
from expert_cache.widths import pool_slots, width_plan
from moe_rt.errors import MoeRtError
from moe_rt.loader import load_spec
from moe_rt.quant.plan import BitsPlan
from moe_rt_app import LLM
from test_ec_quantized import PROMPT, outputs as quantized_outputs

PLAN = {"group_size": 32, "default": 4, "layers": {0: {"full": [1], 8: [3, 5]}, 2: {8: [0, 1, 2, 3]}}}


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("qplan4"), "mixtral", num_hidden_layers=4))


def outputs(model, cache=None):
    return quantized_outputs(model, None, cache, expert_bits_plan=PLAN)


@pytest.fixture(scope="module")
def resident(model4):
    return outputs(model4)


CASES = [("cpu", 2, False), ("disk", 2, False), ("cpu", 4, False), ("cpu", 2, True), ("disk", 4, True),
         ("cpu", 8, "global")]  # 8 of 32: 25%


@pytest.mark.parametrize("offload, slots, predict", CASES, ids=lambda v: str(v))
def test_cached_plan_model_equals_the_resident_one(model4, resident, offload, slots, predict):
    policy = dict(policy="predictive", predictor="gate_lookahead") if predict is True else dict(policy="lru")
    scope = dict(scope="global") if predict == "global" else {}
    cache = dict(offload=offload, capacity_slots=slots, **policy, **scope)  # 25% or 50% of 8 experts
    logits, tokens, stats = outputs(model4, cache)
    assert torch.equal(logits, resident[0])
    assert tokens == resident[1]
    assert stats["loads"] > 0 and stats["expert_format"] == "plan(full, int8, int4-g32)"
    if slots == 2:  # a layer needing both int8 experts of layer 0's one int8 slot streams one
        assert stats["streamed_misses"] > 0
    # every load moved its own width's bytes: the total is a sum of those, checked per width below
    by_width = stats["expert_bytes_by_width"]
    assert by_width["full"] > by_width["8"] > by_width["4"]


def test_each_load_moves_its_widths_real_bytes(model4):
    spec = load_spec(model4)
    wp = width_plan(BitsPlan.from_data(PLAN, "plan"), spec, torch.float32, "cpu", 64)
    assert wp.class_bytes[0] == spec.bytes_per_expert(4)
    assert wp.class_bytes[1] == wp.formats[8].record_bytes and wp.class_bytes[2] == wp.formats[4].record_bytes
    llm = LLM(model4, dtype="float32", device="cpu", progress=False, expert_bits_plan=PLAN,
              cache=dict(offload="cpu", capacity_slots=2, policy="lru"))
    try:
        cache = llm.expert_cache
        loads = []
        read = cache.tier.read_into
        cache.tier.read_into = lambda key, a, b=None: (loads.append(key), read(key, a, b))[1]
        llm.prompt_logits(PROMPT)
        st = cache.state
        assert loads and st.stats.bytes_moved["cpu"] == sum(wp.class_bytes[wp.class_of(k)] for k in loads)
    finally:
        llm.close()


def test_pool_capacities_follow_the_fraction_of_each_widths_experts(model4):
    spec = load_spec(model4)
    wp = width_plan(BitsPlan.from_data(PLAN, "plan"), spec, torch.float32, "cpu", 64)
    slots = pool_slots(CacheConfig(offload="cpu", capacity_slots=4), wp)  # half of each width
    # layer 0: 1 full (at least one slot), 2 int8 -> 1, 5 int4 -> 2; layer 1: 8 int4 -> 4
    assert [slots[p] for p in range(6)] == [1, 1, 2, 0, 0, 4]
    assert [slots[p] for p in (6, 7, 8)] == [0, 2, 2]  # layer 2: 4 int8, 4 int4
    glob = pool_slots(CacheConfig(offload="cpu", capacity_slots=8, scope="global"), wp)  # 25% of 32
    assert glob == {0: 1, 1: 1, 2: 6}  # 1 full, 6 int8, 25 int4
    every = sum(wp.class_bytes[wp.class_of((l, e))] for l in range(4) for e in range(8))
    gb = pool_slots(CacheConfig(offload="cpu", capacity_gb=every / 2 / 1024 ** 3), wp)
    assert gb == slots  # half the real bytes buys half of each width


def test_width_pools_never_evict_across_widths():
    classes = {(0, e): (0 if e in (0, 4) else 2) for e in range(5)}  # 0, 4 full; 1-3 int4
    st = CacheState(1, 2, class_of=classes.__getitem__, classes=3, pool_slots={0: 1, 1: 0, 2: 2},
                    class_bytes=(100, 50, 25))
    assert [st.pool_of((0, e)) for e in range(4)] == [0, 2, 2, 2]
    assert st.capacity(0) == 1 and st.capacity(2) == 2 and st.num_free(1) == 0
    for now, keys in enumerate([[(0, 0)], [(0, 1), (0, 2)], [(0, 3)], [(0, 0)]], start=1):
        st.clear_needed()
        st.mark_needed(keys)
        st.apply_demand(plan_demand(st, keys, "lru"), now)
        st.check_consistent()
        assert (0, 0) in st.entries  # the one full slot is never taken by an int4 expert
    assert st.stats.evictions == 1 and st.stats.bytes_moved["cpu"] == 100 + 3 * 25
    st.clear_needed()
    st.evict((0, 3))  # a free int4 slot is no slot for the other full expert
    with pytest.raises(CacheStateError, match="no free slot"):
        st.admit((0, 4), 9)


def test_pins_must_fit_their_width_pool(model4):
    # at 25%, layer 0's two int8 experts (3, 5) get one slot
    with pytest.raises(MoeRtError, match="pinned expert 5 of layer 0 does not fit: its width \\(8\\) has 1 slot"):
        LLM(model4, dtype="float32", device="cpu", progress=False, expert_bits_plan=PLAN,
            cache=dict(offload="cpu", capacity_slots=2, pinned={0: [3, 5]}, policy="lru"))
