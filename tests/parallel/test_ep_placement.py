import numpy as np
import pytest
import yaml

from moe_rt.errors import MoeRtError
from moe_rt_app.config import load_expert_parallel as load_placement_yaml
from parallel.placement import ExpertParallelPlacement, default_placement, placement_from_section, save_placement_yaml


def test_default_placement_is_contiguous_blocks():
    p = default_placement(num_layers=2, num_experts=8, ranks=4)
    want = {0: [0], 1: [0], 2: [1], 3: [1], 4: [2], 5: [2], 6: [3], 7: [3]}
    assert p.layers == {0: want, 1: want}
    assert p.ranks == 4 and p.capacity_per_rank == 2 and p.planner == "default"
    assert p.primary_table().tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]] * 2
    assert p.experts_on_rank(1, 2) == [4, 5]
    p.validate_against(2, 8)


def test_default_placement_needs_divisible_experts():
    with pytest.raises(MoeRtError, match="3 ranks do not divide 8 experts"):
        default_placement(2, 8, 3)


def _section(**over):
    body = {"ranks": 2, "layers": {0: {0: [0], 1: [1, 0], 2: [1]}}, "capacity_per_rank": 2}
    body.update(over)
    return body


def test_holder_mask_and_replicas():
    p = placement_from_section(_section())
    assert p.primary_table().tolist() == [[0, 1, 1]]
    assert p.holder_mask().tolist() == [[[True, False], [True, True], [False, True]]]
    assert p.num_replicas() == 1
    assert p.experts_on_rank(0, 0) == [0, 1]


@pytest.mark.parametrize("over, msg", [
    ({"layers": {0: {0: [2]}}}, r"layer 0 expert 0: rank 2 outside \[0, 2\)"),
    ({"layers": {0: {0: [1, 1]}}}, "hold the same expert twice"),
    ({"layers": {0: {0: []}}}, "needs at least one rank"),
    ({"layers": {0: {0: [0], 1: [0], 2: [0, 1]}}}, "rank 0 holds 3 experts, more than capacity_per_rank 2"),
    ({"ranks": 0}, "ranks: Input should be greater than or equal to 1"),
    ({"shards": 3}, "shards: Extra inputs are not permitted"),
])
def test_schema_rejects_bad_sections(over, msg):
    with pytest.raises(MoeRtError, match=msg):
        placement_from_section(_section(**over))


def test_validate_against_names_the_gap():
    p = placement_from_section(_section())
    p.validate_against(1, 3)
    with pytest.raises(MoeRtError, match=r"layer 0: expert\(s\) \[3\] not placed"):
        p.validate_against(1, 4)
    with pytest.raises(MoeRtError, match=r"unknown expert\(s\) \[2\]"):
        p.validate_against(1, 2)
    with pytest.raises(MoeRtError, match=r"missing layer\(s\) \[1\]"):
        p.validate_against(2, 3)


def test_yaml_round_trip_and_composed_file(tmp_path):
    p = placement_from_section(_section())
    path = tmp_path / "placement.yaml"
    save_placement_yaml(path, p)
    assert load_placement_yaml(path) == p
    # The lead composes this section with the cache section into one file.
    doc = yaml.safe_load(path.read_text())
    doc["cache"] = {"slots": 4}
    path.write_text(yaml.safe_dump(doc))
    doc = yaml.safe_load(path.read_text())
    assert ExpertParallelPlacement.model_validate(doc["expert_parallel"]) == p
    assert load_placement_yaml(path) == p


def test_yaml_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("cache: {slots: 4}\n")
    with pytest.raises(MoeRtError, match="no top-level 'expert_parallel:' section"):
        load_placement_yaml(path)
    path.write_text("expert_parallel: [1, 2\n")
    with pytest.raises(MoeRtError, match="not valid YAML"):
        load_placement_yaml(path)
    with pytest.raises(MoeRtError, match="does not exist"):
        load_placement_yaml(tmp_path / "missing.yaml")


def test_placement_is_frozen():
    p = default_placement(1, 2, 1)
    with pytest.raises(Exception):
        p.ranks = 3
    assert isinstance(p.primary_table(), np.ndarray)
