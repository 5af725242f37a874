"""`moe-rt plan-bits` on a tiny trace writes the expected plan; `eval-ppl --expert-bits PLAN` and
the config file's inline plan run it; bad plans are one-line CLI errors."""
import argparse
import json

import numpy as np
import torch

from checkpoints import TEXT
from moe_rt.quant.mixed import bytes_per_expert
from moe_rt.quant.plan import load_plan
from moe_rt_app.cli import eval_ppl
from moe_rt_app.cli.flags import config_from_args
from moe_rt_app.cli.main import main
from router_predict.trace import Trace, TraceMeta, save_trace


def _trace(path, model: str):
    """2 MoE layers x 8 experts, top-2: layer 0 uses experts 6 and 2 most, layer 1 experts 0 and 1."""
    rows = [[[6, 2], [0, 1]], [[6, 2], [0, 1]], [[6, 5], [0, 3]], [[2, 4], [1, 7]], [[6, 3], [5, 1]]]
    ids = np.asarray(rows, np.int32)
    n = len(rows)
    save_trace(str(path), Trace(ids, np.full(ids.shape, 0.5, np.float32), np.zeros(n, np.int64),
                                np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64),
                                TraceMeta(8, 2, (0, 1), model)))


def test_plan_bits_writes_the_hottest_experts_wider(mixtral_dir, tmp_path, capsys):
    _trace(tmp_path / "t.npz", str(mixtral_dir))  # the trace names its model: no --model needed
    out = tmp_path / "plan.yaml"
    argv = ["plan-bits", "--trace", str(tmp_path / "t.npz"), "--out", str(out), "--group-size", "32"]
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    plan = load_plan(out)
    assert plan.layers == {0: {8: (2, 6)}, 1: {8: (0, 1)}} and plan.default == 4 and plan.group_size == 32
    text = out.read_text()
    assert text.startswith("# Bits plan written by moe-rt plan-bits from trace") and "2 of 8 most-activated" in text
    assert summary["experts_per_width"] == {"full": 0, "8": 4, "4": 12}
    per = {w: bytes_per_expert(64, 96, w, 32, torch.float32) for w in ("full", 8, 4)}
    assert summary["expert_bytes"] == 4 * per[8] + 12 * per[4]
    assert summary["uniform_expert_bytes"]["4"] == 16 * per[4]
    # a budget of all-int4 plus one upgrade raises the model's hottest expert only (layer 0's 6, 4 uses)
    assert main(argv + ["--budget-bytes", str(16 * per[4] + per[8] - per[4])]) == 0
    assert load_plan(out).layers == {0: {8: (6,)}}
    assert "experts per width: full: 0, 8: 1, 4: 15" in capsys.readouterr().out
    # errors are one line
    assert main(argv + ["--hot-bits", "4", "--cold-bits", "8"]) == 2
    assert capsys.readouterr().err.strip() == "moe-rt: error: --hot-bits 4 must be wider than --cold-bits 8"
    assert main(argv + ["--hot-bits", "16"]) == 2
    assert "unknown bits '16'" in capsys.readouterr().err


def test_eval_ppl_takes_a_plan_by_flag_and_inline_in_the_config(mixtral_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    plan = tmp_path / "plan.yaml"
    plan.write_text("group_size: 32\ndefault: 4\nlayers: {0: {8: [1, 2]}, 1: {full: [0]}}\n")
    argv = ["eval-ppl", "--model", str(mixtral_dir), "--text", str(text), "--dtype", "float32", "--window", "32"]
    assert main(argv + ["--expert-bits", str(plan), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    full, mixed = out["results"]["full"], out["results"]["plan"]
    assert full["tokens"] == mixed["tokens"] > 0 and 0.5 < out["greedy_agreement"] <= 1
    assert set(mixed["expert_bytes_by_width"]) == {"full", "8", "4"} and set(full["expert_bytes_by_width"]) == {"full"}
    assert mixed["expert_bytes"] < full["expert_bytes"] and out["expert_group_size"] == 32
    # the same plan inline in a config file's engine section is the same config; a flag overrides it
    cfg = tmp_path / "config.yaml"
    cfg.write_text("engine:\n  expert_bits_plan:\n" + "".join(f"    {line}\n" for line in plan.read_text().splitlines()))
    parser = argparse.ArgumentParser()
    eval_ppl.add_arguments(parser)

    def engine(*extra):
        return config_from_args(parser.parse_args(argv[1:] + list(extra))).engine

    assert engine("--config", str(cfg)) == engine("--expert-bits", str(plan)) != engine()
    assert engine("--config", str(cfg), "--expert-bits", "8").expert_bits_plan is None
    # bad plans are one line naming the flag
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: {0: {8: [9]}}\n")
    assert main(argv + ["--expert-bits", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layer 0: expert 9 is out of range (the model has 8 experts per layer)" in err
    assert main(argv + ["--expert-bits", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (f"moe-rt: error: invalid option --expert-bits: bits plan "
                                               f"{tmp_path}/none.yaml does not exist")
    assert main(argv + ["--expert-bits", "3"]) == 2
    assert "--expert-bits takes 8, 4 or a bits-plan file, got 3" in capsys.readouterr().err
