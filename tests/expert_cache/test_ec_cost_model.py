"""The offload latency model on hand-computed cases."""
import pytest

from expert_cache import cost_model as cm
from moe_rt.errors import MoeRtError


def inputs(m, p, layer_s=0.010):
    # 4 layers, 1 MB experts over 100 MB/s: one copy = 10 ms
    return cm.CostInputs(4, layer_s, 0.002, 1_000_000, 1e8, m, p)


def test_all_hits_is_compute_bound():
    assert cm.step_seconds(inputs(0, 0)) == pytest.approx(0.002 + 4 * 0.010)


def test_demand_misses_stall_and_prefetch_hides_while_the_link_keeps_up():
    assert cm.step_seconds(inputs(1, 0)) == pytest.approx(0.002 + 4 * 0.020)
    assert cm.step_seconds(inputs(0, 1)) == pytest.approx(0.002 + 4 * 0.010)  # fully hidden
    assert cm.step_seconds(inputs(0, 2)) == pytest.approx(0.002 + 4 * 0.020)  # link-bound
    assert cm.tokens_per_s(inputs(0, 0)) == pytest.approx(1 / 0.042)


def test_rates_from_replay_and_fiddler_rule():
    assert cm.rates_from_replay({"misses": 30, "prefetches_issued": 10}, 20) == (1.5, 0.5)
    assert cm.cpu_beats_transfer(1_000_000, 1e8, 0.005)
    assert not cm.cpu_beats_transfer(1_000_000, 1e8, 0.02)
    with pytest.raises(MoeRtError):
        cm.rates_from_replay({"misses": 1, "prefetches_issued": 0}, 0)


def test_mixtral_assumptions():
    assert cm.MIXTRAL_EXPERT_BYTES == 352_321_536
    slots = cm.mixtral_capacity_slots()
    assert 40 <= slots <= 60  # of 256 experts: ~20%
    t = cm.tokens_per_s(cm.mixtral_inputs(misses_per_layer=1.0))
    assert 1.0 < t < 3.0  # ~14 ms per missed expert x 32 layers dominates
