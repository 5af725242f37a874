"""`moe-rt simulate-cache` end to end on a tiny .npz, and bad input exiting 2."""
import json

import numpy as np
import pytest

from ec_helpers import random_trace, write_npz
from moe_rt_app.cli.simulate_cache import main, sweep_capacities


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "t.npz"
    write_npz(path, random_trace(0, n=16, num_experts=4))
    return path


def test_table_output(trace_file, capsys):
    assert main(["--trace", str(trace_file), "--capacity", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lru" in out and "lfu" in out and "belady" in out


def test_json_with_oracle_and_plot(trace_file, tmp_path, capsys):
    png = tmp_path / "curve.png"
    rc = main(["--trace", str(trace_file), "--capacity", "2", "--policy", "lru,predictive",
               "--predictor", "oracle", "--depth", "2", "--json", "--plot", str(png)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["policies"]) == {"lru", "predictive"}
    b = report["belady"]
    lru = report["policies"]["lru"]
    assert lru["hit_rate"] <= b["hit_rate"]
    assert lru["ratio_to_belady"] == pytest.approx(lru["hit_rate"] / b["hit_rate"])
    assert report["policies"]["predictive"]["loads"] >= b["loads"]
    assert report["curve"]["capacities"] == [1, 2, 3, 4]
    assert set(report["curve"]["hit_rate"]) == {"lru", "predictive", "belady"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registry_predictor_fitted_on_another_trace(trace_file, tmp_path, capsys):
    fit = tmp_path / "fit.npz"
    write_npz(fit, random_trace(1, n=16, num_experts=4))
    rc = main(["--trace", str(trace_file), "--capacity", "1", "--predictor", "frequency",
               "--fit-on", str(fit), "--json", "--scope", "global"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scope"] == "global" and report["pool_slots"] == 3
    assert report["policies"]["predictive"]["prefetches_issued"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--capacity", "0"], "--capacity must be between 1 and 4"),
    (["--capacity", "9"], "--capacity must be between 1 and 4"),
    (["--capacity", "1", "--policy", "fifo"], "unknown policy"),
    (["--capacity", "1", "--policy", "predictive"], "needs --predictor"),
    (["--capacity", "1", "--policy", "lru", "--predictor", "oracle"], "only used by policy predictive"),
    (["--capacity", "1", "--predictor", "frequency"], "--fit-on"),
    (["--capacity", "1", "--depth", "0"], "--depth"),
    (["--capacity", "1", "--plot", "x.jpg"], "must end in .png"),
])
def test_bad_input_exits_2(trace_file, capsys, extra, message):
    assert main(["--trace", str(trace_file), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-rt: error: ") and message in err
    assert err.count("\n") == 1


def test_bad_files_exit_2(tmp_path, trace_file, capsys):
    assert main(["--trace", str(tmp_path / "missing.npz"), "--capacity", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.npz"
    np.savez(broken, topk_ids=np.zeros((2, 1, 1), np.int32))
    assert main(["--trace", str(broken), "--capacity", "1"]) == 2
    assert "missing array" in capsys.readouterr().err
    assert main(["--trace", str(trace_file), "--capacity", "1", "--no-progress",
                 "--plot", str(trace_file / "x.png")]) == 2  # folders are created, but not under a file
    assert "--plot cannot write" in capsys.readouterr().err


def test_sweep_capacities():
    assert sweep_capacities(4, 2) == [1, 2, 3, 4]
    caps = sweep_capacities(64, 5)
    assert caps[0] == 1 and caps[-1] == 64 and 5 in caps and len(caps) <= 17
