import argparse
import json

import numpy as np
import pytest
import yaml

from ep_helpers import planted_ids, write_trace
from moe_rt_app.cli import plan_placement as cli_plan, simulate_ep as cli_simulate_ep
from parallel.placement import ExpertParallelPlacement


def test_plan_placement_writes_yaml_and_reports(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.npz", planted_ids(), 8)
    out = tmp_path / "placement.yaml"
    assert cli_plan.main(["--trace", trace, "--ranks", "4", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    placement = ExpertParallelPlacement.model_validate(yaml.safe_load(out.read_text())["expert_parallel"])
    placement.validate_against(2, 8)
    assert placement.planner == "s-EG" and placement.ranks == 4
    assert summary["unit"] == "rows" and summary["in_sample"] is True
    # Rows per token over both layers: 2 * (128 + 192) / 64 for default, 2 * 96 * 2 / 64 grouped.
    assert summary["a2a_per_token"]["default"] == 5.0
    assert summary["a2a_per_token"]["s-EG"] == 3.0
    # With s-TS the grouped placement keeps layer 1 fully local: (32 + 128) / 256 = 0.625.
    assert summary["local_share"]["s-TS s-EG"] == 0.625
    assert summary["local_share"]["s-TS s-EG"] > summary["local_share"]["s-TS default"]

    assert cli_plan.main(["--trace", trace, "--ranks", "4", "--out", str(out),
                          "--hidden", "16"]) == 0
    text = capsys.readouterr().out
    assert "all-to-all bytes/token  default 160.0   s-EG 96.0   ratio 0.600" in text


def test_simulate_ep_json_and_plot(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.npz", planted_ids(), 8, hidden=4)
    png = tmp_path / "ep.png"
    assert cli_simulate_ep.main(["--trace", trace, "--ranks", "2,4", "--json",
                                 "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unit"] == "bytes" and report["hidden"] == 4
    assert report["planned_on_tokens"] + report["counted_on_tokens"] == 64
    assert [r["ranks"] for r in report["results"]] == [2, 4]
    for r in report["results"]:
        schemes = r["schemes"]
        assert list(schemes) == ["baseline", "s-TS", "s-EG", "s-TS+s-EG"]
        # Held-out tokens follow the same planted groups, so grouping must help out of sample.
        assert schemes["s-EG"]["a2a_bytes_per_token"] < schemes["baseline"]["a2a_bytes_per_token"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli_simulate_ep.main(["--trace", trace, "--ranks", "4", "--eval-split", "0",
                                 "--predictor", "oracle"]) == 0
    text = capsys.readouterr().out
    assert "in-sample" in text and "s-TS+s-EG" in text


@pytest.mark.parametrize("module, extra, msg", [
    (cli_plan, ["--ranks", "3", "--out", "{tmp}/p.yaml"], "3 ranks do not divide 8 experts"),
    (cli_plan, ["--ranks", "4", "--out", "{tmp}/t.npz/p.yaml"], "--out cannot write"),  # under a file
    (cli_plan, ["--ranks", "4", "--out", "{tmp}/p.yaml", "--replicas", "-1"], "replicas must be"),
    (cli_simulate_ep, ["--ranks", "4,3"], "--ranks 3 does not divide"),
    (cli_simulate_ep, ["--ranks", "4", "--eval-split", "1.5"], "--eval-split must be in"),
])
def test_bad_input_exits_2(tmp_path, capsys, module, extra, msg):
    trace = write_trace(tmp_path / "t.npz", planted_ids(), 8)
    argv = ["--trace", trace] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-rt: error: ") and msg in err and err.count("\n") == 1


def test_bad_trace_and_flags_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, topk_ids=np.zeros((2, 1, 1), dtype=np.int32))
    assert cli_simulate_ep.main(["--trace", str(bad), "--ranks", "1"]) == 2
    assert "missing array(s)" in capsys.readouterr().err
    try:  # argparse rejects the rank list itself: exit status 2, returned or raised
        code = cli_simulate_ep.main(["--trace", str(bad), "--ranks", "8,x"])
    except SystemExit as e:
        code = e.code
    assert code == 2


def test_default_ranks_divide_the_experts(tmp_path, capsys):
    assert cli_simulate_ep.default_rank_counts(16) == [2, 4, 8, 16]
    assert cli_simulate_ep.default_rank_counts(60) == [2, 4]
    assert cli_simulate_ep.default_rank_counts(256) == [2, 4, 8, 16, 32, 64]
    trace = write_trace(tmp_path / "t.npz", planted_ids(), 8)
    assert cli_simulate_ep.main(["--trace", trace, "--json"]) == 0
    out = capsys.readouterr().out
    assert [r["ranks"] for r in json.loads(out[out.index("{"):])["results"]] == [2, 4, 8]


def test_add_arguments_registers_on_a_subparser():
    parser = argparse.ArgumentParser(prog="moe-rt")
    sub = parser.add_subparsers(dest="command")
    cli_plan.add_arguments(sub.add_parser("plan-placement"))
    cli_simulate_ep.add_arguments(sub.add_parser("simulate-ep"))
    args = parser.parse_args(["simulate-ep", "--trace", "t.npz"])
    assert args.ranks is None and args.eval_split == 0.5 and args.predictor == "prev-layer"
    args = parser.parse_args(["plan-placement", "--trace", "t.npz", "--ranks", "8", "--out", "p.yaml"])
    assert args.replicas == 0 and args.load_tolerance == 0.1
