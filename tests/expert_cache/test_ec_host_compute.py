"""cpu_compute_on_miss: misses run on the host where their weights are (LayerExperts.host_compute).

The pure rule (cost_model.choose_host_experts) is checked with exact outputs; the mechanism is
checked end to end on CPU by forcing it ("always"): greedy fp32 output must equal the
all-resident model while fewer bytes move.
"""
import pytest
import torch

from expert_cache.config import load_cache_config
from expert_cache.cost_model import HostRule, choose_host_experts, host_expert_seconds
from moe_rt_app import LLM, SamplingParams
from moe_rt.errors import MoeRtError

PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], [100, 3, 44, 55, 66, 77, 88]]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

# 1 MB experts over a 1 GB/s link: a copy costs 1 ms. On the host (roofline, until measured):
# reading the weights at 2 GB/s takes 0.5 ms, and 1e6 flops per row at 1e9 flop/s 1 ms per row.
RULE = HostRule(expert_bytes=1_000_000, link_bytes_per_s=1e9, flops_per_row=1e6,
                host_bytes_per_s=2e9, host_flops=1e9)


# -- the pure rule ---------------------------------------------------------------------------------
def test_host_seconds_roofline_then_measured():
    assert host_expert_seconds(0, RULE) == 0.0005  # the weight read dominates
    assert host_expert_seconds(3, RULE) == 0.003  # the GEMM dominates
    measured = HostRule(1_000_000, 1e9, 1e6, row_s=0.0002)
    assert host_expert_seconds(3, measured) == pytest.approx(0.0006)


def test_choose_host_experts_exact():
    missed = {4: 1, 0: 3, 7: 2, 2: 0}  # expert id -> token rows
    # auto across devices: host time 1 ms/row (>= 0.5 ms) vs 1 ms copy; strictly less wins.
    assert choose_host_experts("auto", missed, same_device=False, rule=RULE) == [2]
    faster = HostRule(1_000_000, 1e9, 1e6, host_bytes_per_s=2e9, host_flops=2.5e9)  # 0.4 ms/row
    assert choose_host_experts("auto", missed, same_device=False, rule=faster) == [2, 4, 7]
    measured = HostRule(1_000_000, 1e9, 1e6, row_s=0.0003)
    assert choose_host_experts("auto", missed, same_device=False, rule=measured) == [0, 2, 4, 7]
    slow_link = HostRule(1_000_000, 1e8, 1e6, host_bytes_per_s=2e9, host_flops=1e9)  # 10 ms copy
    assert choose_host_experts("auto", missed, same_device=False, rule=slow_link) == [0, 2, 4, 7]


def test_choose_host_experts_modes():
    missed = {4: 1, 0: 3}
    assert choose_host_experts(False, missed, same_device=False, rule=RULE) == []
    assert choose_host_experts("always", missed, same_device=True, rule=RULE) == [0, 4]
    measured = HostRule(1_000_000, 1e9, 1e6, row_s=1e-9)  # host looks free...
    assert choose_host_experts("auto", missed, same_device=True, rule=measured) == []  # ...but is the device
    assert choose_host_experts("auto", {}, same_device=False, rule=measured) == []
    with pytest.raises(MoeRtError, match="unknown host-compute mode"):
        choose_host_experts("sometimes", missed, same_device=False, rule=RULE)


def test_config_true_means_auto():
    base = {"capacity_slots": 2}
    assert load_cache_config({**base, "cpu_compute_on_miss": True}).cpu_compute_on_miss == "auto"
    assert load_cache_config({**base, "cpu_compute_on_miss": False}).cpu_compute_on_miss is False
    assert load_cache_config({**base, "cpu_compute_on_miss": "always"}).cpu_compute_on_miss == "always"
    with pytest.raises(MoeRtError, match="cpu_compute_on_miss must be"):
        load_cache_config({**base, "cpu_compute_on_miss": "yes"})
    with pytest.raises(MoeRtError, match="needs offload: cpu"):
        load_cache_config({**base, "offload": "disk", "cpu_compute_on_miss": "always"})


# -- the mechanism, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(mixtral_dir):
    llm = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def run(model, cache, device="cpu"):
    llm = LLM(model, dtype="float32", device=device, progress=False, cache=cache)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)], llm.expert_cache.stats()
    finally:
        llm.expert_cache.close()


BASE = dict(offload="cpu", capacity_slots=2, policy="lru")


def test_always_equals_all_resident_and_moves_fewer_bytes(mixtral_dir, reference):
    out_copy, copied = run(mixtral_dir, BASE)
    out_host, host = run(mixtral_dir, {**BASE, "cpu_compute_on_miss": "always"})
    assert out_copy == reference and out_host == reference
    assert copied["host_computed"] == 0 and copied["bytes_moved_total"] > 0
    assert host["host_computed"] > 0 and host["host_computed_rows"] >= host["host_computed"]
    assert host["bytes_moved_total"] < copied["bytes_moved_total"]
    assert host["host_bytes_not_moved"] == host["host_computed"] * host["expert_bytes"]
    # a host-computed miss is a fast-tier miss but no copy
    assert host["loads"] == host["misses"] - host["host_computed"] + host["prefetches_issued"]
    assert host["bytes_moved_total"] == host["loads"] * host["expert_bytes"]
    assert sum(c["host_computed"] for c in host["per_layer"].values()) == host["host_computed"]
    assert host["host_row_s_avg"] > 0


def test_always_mixes_slot_and_host_experts_in_one_layer(mixtral_dir, reference):
    # Pinned experts are hits computed from their slots; the rest of the same layer on the host.
    # Prefetch loads experts into slots too, so layers mix prefetched, pinned and host experts.
    cache = dict(offload="cpu", capacity_slots=4, policy="predictive", predictor="gate_lookahead",
                 pinned={0: [0, 1], 1: [2]}, cpu_compute_on_miss="always")
    out, s = run(mixtral_dir, cache)
    assert out == reference
    assert s["host_computed"] > 0 and s["hits"] > 0
    pinned = 3
    assert s["bytes_moved_total"] == (s["loads"] + pinned) * s["expert_bytes"]


def test_auto_on_cpu_never_host_computes(mixtral_dir, reference):
    out, s = run(mixtral_dir, {**BASE, "cpu_compute_on_miss": True})
    _, plain = run(mixtral_dir, BASE)
    assert out == reference
    assert s["cpu_compute_on_miss"] == "auto"
    assert s["host_computed"] == 0 and s["host_computed_rows"] == 0
    assert s["bytes_moved_total"] == plain["bytes_moved_total"] > 0
    assert s["link_bytes_per_s"] is None  # nothing to measure: host and device are one


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_follows_the_rule(mixtral_dir, reference):
    out, s = run(mixtral_dir, {**BASE, "cpu_compute_on_miss": "auto"}, device="cuda")
    assert out == reference
    assert s["link_bytes_per_s"] > 0  # measured at start-up
    assert s["bytes_moved_total"] == s["loads"] * s["expert_bytes"]
    assert s["host_bytes_not_moved"] == s["host_computed"] * s["expert_bytes"]
    out, s = run(mixtral_dir, {**BASE, "cpu_compute_on_miss": "always"}, device="cuda")
    assert out == reference
    assert s["host_computed"] > 0 and s["bytes_moved_total"] == s["loads"] * s["expert_bytes"]
