"""CacheConfig validation: what is accepted, and the one-line messages for what is not."""
import pytest
import yaml

from expert_cache.config import GIB, CacheConfig, load_cache_config
from moe_rt.errors import MoeRtError

PLACEMENT = """
cache:
  capacity_slots: 4
  scope: global
  offload: cpu
  policy: predictive
  lookahead: auto
  prefetch_queue: 2
  pinned: {0: [1, 2], 3: [0]}
  cpu_compute_on_miss: true
"""


def test_yaml_cache_section_round_trip():
    cfg = load_cache_config(yaml.safe_load(PLACEMENT)["cache"])
    assert cfg.capacity_slots == 4 and cfg.scope == "global" and cfg.lookahead == "auto"
    assert cfg.pinned_keys() == [(0, 1), (0, 2), (3, 0)]
    assert CacheConfig.model_validate(cfg.model_dump()) == cfg


def test_every_field_has_help_text():
    for name, f in CacheConfig.model_fields.items():
        assert f.description, name


@pytest.mark.parametrize("data, message", [
    ({}, "exactly one of capacity_slots and capacity_gb"),
    ({"capacity_slots": 2, "capacity_gb": 1.0}, "both are set"),
    ({"capacity_slots": 0}, "capacity_slots"),
    # The predictor is the config tree's own section (tests/test_config_tree.py), not the cache's.
    ({"capacity_slots": 2, "predictor": "frequency"}, "predictor: Extra inputs"),
    ({"capacity_slots": 2, "policy": "arc"}, "policy"),
    ({"capacity_slots": 2, "lookahead": 0}, "lookahead must be an integer >= 1"),
    ({"capacity_slots": 2, "lookahead": "soon"}, "lookahead must be an integer >= 1 or .auto., got .soon."),
    ({"capacity_slots": 2, "prefetch_queue": -1}, "prefetch_queue"),
    ({"capacity_slots": 2, "offload": "disk", "cpu_compute_on_miss": True}, "needs offload: cpu"),
    ({"capacity_slots": 1, "pinned": {0: [1, 2]}}, "layer 0 pins 2 experts"),
    ({"capacity_slots": 2, "scope": "global", "pinned": {0: [1], 1: [1, 2]}}, "exceed"),
    ({"capacity_slots": 4, "pinned": {0: [1, 1]}}, "repeat"),
    ({"capacity_slots": 4, "pinned": {-1: [1]}}, "negative"),
    ({"offload": "none", "capacity_slots": 2}, "offload: none"),
    ({"capacity_slots": 2, "capcity_gb": 1}, "capcity_gb"),  # extra="forbid" catches typos
    ({"capacity_slots": 2, "predictor_dir": "x", "policy": "lru"}, "predictor_dir"),
])
def test_bad_configs_raise_one_line_errors(data, message):
    with pytest.raises(MoeRtError, match=message) as e:
        load_cache_config(data)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("cache")


def test_offload_none_needs_no_capacity():
    cfg = load_cache_config({"offload": "none"})
    assert cfg.resolve_capacity_slots(expert_bytes=0, num_layers=3, num_experts=8) == 8


def test_not_a_mapping():
    with pytest.raises(MoeRtError, match="must be a mapping"):
        load_cache_config([1, 2])


def test_resolve_capacity_from_gb():
    per = load_cache_config({"capacity_gb": 1.0})
    # 1 GiB of 64 MiB experts = 16 slots, split over 4 layers = 4 per layer.
    assert per.resolve_capacity_slots(GIB // 16, num_layers=4, num_experts=8) == 4
    glob = load_cache_config({"capacity_gb": 1.0, "scope": "global"})
    assert glob.resolve_capacity_slots(GIB // 16, num_layers=4, num_experts=8) == 16
    # Never more slots than experts exist.
    assert glob.resolve_capacity_slots(GIB // 1024, num_layers=4, num_experts=8) == 32
    with pytest.raises(MoeRtError, match="holds no expert"):
        per.resolve_capacity_slots(GIB, num_layers=4, num_experts=8)
    with pytest.raises(MoeRtError, match="expert size"):
        per.resolve_capacity_slots(0, num_layers=4, num_experts=8)


def test_check_model_ranges():
    cfg = load_cache_config({"capacity_slots": 2, "pinned": {1: [7]}})
    cfg.check_model(num_layers=2, num_experts=8)
    with pytest.raises(MoeRtError, match="pinned layer 1"):
        cfg.check_model(num_layers=1, num_experts=8)
    with pytest.raises(MoeRtError, match="pinned expert 7"):
        cfg.check_model(num_layers=2, num_experts=4)
