import json

import numpy as np
import pytest

from moe_rt.errors import MoeRtError
from router_predict.trace import (Trace, TraceMeta, iter_steps, load_trace, save_trace, select_seqs,
                                  split_by_seq, step_bounds)
from rp_helpers import make_trace


def small_trace(**kw) -> Trace:
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 0], [1, 2]]])
    return make_trace(ids, 4, seq_ids=[7, 8, 7], steps=[0, 0, 1], positions=[0, 0, 1], **kw)


def test_round_trip_with_optional_arrays(tmp_path):
    hidden = np.arange(3 * 2 * 5).reshape(3, 2, 5) / 10
    t = small_trace(hidden=hidden, token_ids=[5, 6, 9], layer_output=-hidden)
    t = Trace(**{**t.__dict__, "meta": TraceMeta(4, 2, (1, 3), "m", {"note": "x"})})
    save_trace(tmp_path / "t.npz", t)
    u = load_trace(tmp_path / "t.npz")
    for name in ("topk_ids", "topk_weights", "seq_ids", "positions", "steps", "hidden", "token_ids",
                 "layer_output"):
        a, b = getattr(t, name), getattr(u, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert u.meta == TraceMeta(4, 2, (1, 3), "m", {"note": "x"})
    assert (u.num_rows, u.num_layers, u.top_k, u.num_experts) == (3, 2, 2, 4)


def test_round_trip_without_optional_arrays(tmp_path):
    save_trace(tmp_path / "t.npz", small_trace())
    u = load_trace(tmp_path / "t.npz")
    assert u.hidden is None and u.token_ids is None and u.layer_output is None


def test_take_keeps_layer_output():
    t = small_trace(layer_output=np.arange(3 * 2 * 4).reshape(3, 2, 4))
    assert t.take(np.array([0, 2])).layer_output[:, 1, 0].tolist() == [4.0, 20.0]


def write_raw(path, **over):
    """Write a trace file by hand, as an outside tool would, with some entries replaced/removed."""
    t = small_trace(hidden=np.zeros((3, 2, 4)), token_ids=[1, 2, 3])
    arrays = {"topk_ids": t.topk_ids, "topk_weights": t.topk_weights, "seq_ids": t.seq_ids,
              "positions": t.positions, "steps": t.steps, "hidden": t.hidden,
              "token_ids": t.token_ids,
              "meta": np.array(json.dumps({"num_experts": 4, "top_k": 2, "layer_ids": [0, 1],
                                           "model": "m"}))}
    for k, v in over.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(path, **arrays)
    return path


def meta(**over):
    body = {"num_experts": 4, "top_k": 2, "layer_ids": [0, 1], "model": "m", **over}
    return np.array(json.dumps({k: v for k, v in body.items() if v is not None}))


BAD = {
    "missing": ({"steps": None}, "missing array(s) steps"),
    "ids_rank": ({"topk_ids": np.zeros((10, 3), np.int32)},
                 "topk_ids has shape (10, 3) but must be [N, L, k]"),
    "ids_dtype": ({"topk_ids": np.zeros((3, 2, 2), np.int64)}, "topk_ids has dtype int64 but must be int32"),
    "weights_shape": ({"topk_weights": np.zeros((3, 2, 3), np.float32)}, "topk_weights has shape (3, 2, 3)"),
    "weights_dtype": ({"topk_weights": np.zeros((3, 2, 2), np.float64)}, "topk_weights has dtype float64"),
    "seq_shape": ({"seq_ids": np.zeros(4, np.int64)}, "seq_ids has shape (4,) but must be [N] = (3,)"),
    "pos_dtype": ({"positions": np.zeros(3, np.int32)}, "positions has dtype int32 but must be int64"),
    "hidden_dtype": ({"hidden": np.zeros((3, 2, 4), np.float32)}, "hidden has dtype float32 but must be float16"),
    "hidden_shape": ({"hidden": np.zeros((3, 1, 4), np.float16)}, "hidden has shape (3, 1, 4)"),
    "out_dtype": ({"layer_output": np.zeros((3, 2, 4), np.float32)},
                  "layer_output has dtype float32 but must be float16"),
    "out_shape": ({"layer_output": np.zeros((3, 1, 4), np.float16)},
                  "layer_output has shape (3, 1, 4) but must be [N, L, H] with N, L = 3, 2"),
    "out_rows": ({"layer_output": np.zeros((2, 2, 4), np.float16)}, "layer_output has shape (2, 2, 4)"),
    "out_size": ({"layer_output": np.zeros((3, 2, 5), np.float16)},
                 "layer_output has H = 5 but hidden has H = 4"),
    "token_dtype": ({"token_ids": np.zeros(3, np.int32)}, "token_ids has dtype int32"),
    "id_range": ({"topk_ids": np.full((3, 2, 2), [0, 4], np.int32)}, "contains expert 4, outside [0, 4)"),
    "id_negative": ({"topk_ids": np.full((3, 2, 2), [-1, 0], np.int32)}, "contains expert -1"),
    "id_repeat": ({"topk_ids": np.full((3, 2, 2), [1, 1], np.int32)}, "repeats an expert"),
    "steps_back": ({"steps": np.array([0, 2, 1], np.int64)},
                   "steps must be non-decreasing (row 2 goes back from 2 to 1)"),
    "meta_missing": ({"meta": meta(layer_ids=None)}, "meta lacks required key(s) layer_ids"),
    "meta_json": ({"meta": np.array("{nope")}, "meta is not valid JSON"),
    "meta_array": ({"meta": np.zeros(3)}, "meta must be a single JSON string"),
    "meta_topk": ({"meta": meta(top_k=3)}, "meta top_k is 3 but topk_ids has k = 2"),
    "meta_layers": ({"meta": meta(layer_ids=[0])}, "meta layer_ids has 1 entries but topk_ids has L = 2"),
    "meta_type": ({"meta": meta(num_experts="4")}, "meta num_experts must be an integer"),
    "nan_weights": ({"topk_weights": np.full((3, 2, 2), np.nan, np.float32)}, "NaN"),
    "empty": ({k: np.zeros((0,) + s, d) for k, s, d in [
        ("topk_ids", (2, 2), np.int32), ("topk_weights", (2, 2), np.float32), ("seq_ids", (), np.int64),
        ("positions", (), np.int64), ("steps", (), np.int64), ("token_ids", (), np.int64),
        ("hidden", (2, 4), np.float16)]}, "trace has no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_validation_error_is_one_line_naming_the_problem(tmp_path, case):
    over, expected = BAD[case]
    path = write_raw(tmp_path / "x.npz", **over)
    with pytest.raises(MoeRtError) as e:
        load_trace(path)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg and msg.startswith(f"trace {path}:")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(MoeRtError, match="not a readable .npz"):
        load_trace(tmp_path / "bad.npz")
    with pytest.raises(MoeRtError, match="no such file"):
        load_trace(tmp_path / "none.npz")


def test_save_refuses_invalid_trace(tmp_path):
    t = small_trace()
    t.steps = np.array([1, 0, 0], np.int64)
    with pytest.raises(MoeRtError, match="non-decreasing"):
        save_trace(tmp_path / "t.npz", t)


def test_step_iteration_and_bounds():
    assert step_bounds(np.array([0, 0, 3, 3, 3, 4])) == [(0, 0, 2), (3, 2, 5), (4, 5, 6)]
    t = small_trace()
    got = [(s, t.take(rows).seq_ids.tolist()) for s, rows in iter_steps(t)]
    assert got == [(0, [7, 8]), (1, [7])]


def test_split_by_seq_keeps_sequences_whole():
    ids = np.zeros((10, 1, 1))
    t = make_trace(ids, 2, seq_ids=[0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    train, held = split_by_seq(t, held_out=0.2, seed=3)
    assert len(set(train.seq_ids) & set(held.seq_ids)) == 0
    assert sorted(set(train.seq_ids) | set(held.seq_ids)) == [0, 1, 2, 3, 4]
    assert len(set(held.seq_ids)) == 1 and held.num_rows == 2
    assert np.all(np.diff(train.steps) >= 0)  # execution order kept
    assert select_seqs(t, [4]).positions.tolist() == [4, 9]
    with pytest.raises(MoeRtError, match="1 sequence"):
        split_by_seq(make_trace(ids, 2))
