"""bench offload on a tiny synthetic model: every configuration measured, ratios against resident
and naive from the same run, medians and fastest runs both reported."""
import json

from moe_rt_app.cli.main import main


def _run_json(argv: list[str], capsys) -> dict:
    """Run a --json bench command (exit status 0) and return its JSON result."""
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_bench_offload_reports_ratios_and_repeats(tmp_path, capsys):
    argv = ["bench", "offload", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--capacities", "50",
            "--predictors", "frequency", "--prefetch-rules", "cost,always", "--prefetch-switches", "measured,on",
            "--fit-prompts", "2", "--max-tokens", "3", "--repeats", "2", "--torch-threads", "1", "--no-progress",
            "--json"]
    res = _run_json(argv, capsys)
    rows = {r["config"]: r for r in res["results"]}
    assert list(rows) == ["resident", "naive", "lru", "pred+frequency", "pred+frequency/on",
                          "pred+frequency/always", "pred+frequency/always/on"]
    assert 0 <= rows["pred+frequency"]["prediction_on"] <= 1  # the measured switch reports its share
    assert rows["pred+frequency/on"]["prediction_on"] is None and rows["lru"]["prediction_on"] is None
    assert res["max_tokens"] == 3 and res["repeats"] == 2
    for r in rows.values():
        assert 0 < r["tok_s"] <= r["tok_s_best"]
        assert abs(r["vs_resident"] - r["tok_s"] / rows["resident"]["tok_s"]) < 1e-9
        assert abs(r["vs_naive_best"] - r["tok_s_best"] / rows["naive"]["tok_s_best"]) < 1e-9
    assert rows["resident"]["vs_resident"] == 1.0 and rows["naive"]["vs_naive"] == 1.0
    assert 0 <= rows["lru"]["hit_rate"] <= 1 and rows["lru"]["loads"] > 0
    lru, pred = rows["lru"], rows["pred+frequency"]
    assert lru["vs_lru"] == 1.0 and lru["bytes_vs_lru"] == 1.0
    assert abs(pred["vs_lru"] - pred["tok_s"] / lru["tok_s"]) < 1e-9
    assert abs(pred["bytes_vs_lru"] - pred["mb_per_token"] / lru["mb_per_token"]) < 1e-9
    for r in (rows["naive"], lru, pred):
        assert r["mb_per_token"] > 0 and r["stall_ms_per_token"] >= 0
    assert pred["prefetches"] >= pred["prefetch_hits"] >= 0 and pred["wasted"] >= 0
    assert res["expert_tier"] == "expert packs, O_DIRECT" and res["tier_read_ms_per_expert"] > 0


def test_bench_offload_compares_scheduling_policies_against_fcfs(tmp_path, capsys):
    argv = ["bench", "offload", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--capacities", "25",
            "--scheduler-policy", "expert_aware", "--concurrency", "4", "--expert-aware-batch", "2",
            "--max-tokens", "4", "--repeats", "2", "--torch-threads", "1", "--no-progress", "--json"]
    res = _run_json(argv, capsys)
    rows = {(r["figure"], r["policy"]): r for r in res["results"]}
    figures = {f for f, _ in rows}
    assert {"tok_s", "experts_per_layer_step", "ttft_ms", "tpot_p99_ms"} <= figures
    for f in figures:  # fcfs is always the baseline, measured in the same run
        assert rows[(f, "fcfs")]["vs_fcfs"] == 1.0
        ea = rows[(f, "expert_aware")]
        assert abs(ea["vs_fcfs"] - ea["median"] / rows[(f, "fcfs")]["median"]) < 1e-9
    assert rows[("tok_s", "expert_aware")]["best"] >= rows[("tok_s", "expert_aware")]["median"] > 0
    assert rows[("ttft_ms", "fcfs")]["best"] <= rows[("ttft_ms", "fcfs")]["median"]
    assert res["scheduler_stats_last"]["expert_aware"]["partial_steps"] > 0


def test_bench_offload_adds_quantized_lru_rows_against_the_full_precision_one(tmp_path, capsys):
    import torch

    from expert_cache.records import expert_format
    from moe_rt.loader import load_spec

    plan = tmp_path / "plan.yaml"  # layer 0's experts 0 and 1 at int8, every other at int4
    plan.write_text("default: 4\nlayers: {0: {8: [0, 1]}}\n")
    argv = ["bench", "offload", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--capacities", "25",
            "--predictors", "", "--expert-bits", f"8,4,{plan}", "--group-size", "32", "--fit-prompts", "2",
            "--max-tokens", "3", "--repeats", "1", "--torch-threads", "1", "--no-progress", "--json"]
    res = _run_json(argv, capsys)
    rows = {r["config"]: r for r in res["results"]}
    assert list(rows) == ["resident", "resident/int8", "resident/int4", "resident/plan", "naive", "lru", "lru/int8",
                          "lru/int4", "lru/plan"]
    assert abs(rows["resident/int8"]["vs_resident"] - rows["resident/int8"]["tok_s"] / rows["resident"]["tok_s"]) < 1e-9
    spec = load_spec(res["model"])
    lru = rows["lru"]
    assert abs(lru["gb_moved"] * 1e9 / lru["loads"] - spec.bytes_per_expert(4)) < 1e-3  # fp32 experts
    for bits in (8, 4):
        r = rows[f"lru/int{bits}"]
        record = expert_format(spec, bits, 32, torch.float32, "cpu").record_bytes
        assert abs(r["gb_moved"] * 1e9 / r["loads"] - record) < 1e-3  # one record per load
        assert abs(r["bytes_vs_lru"] - r["mb_per_token"] / lru["mb_per_token"]) < 1e-9
        assert abs(r["vs_lru"] - r["tok_s"] / lru["tok_s"]) < 1e-9
        assert abs(r["speed_target"] - (1 + (1 - r["bytes_vs_lru"]) / 2)) < 1e-9
    records = [expert_format(spec, bits, 32, torch.float32, "cpu").record_bytes for bits in (4, 8)]
    per_load = rows["lru/plan"]["gb_moved"] * 1e9 / rows["lru/plan"]["loads"]  # each load its own width's bytes
    assert records[0] <= per_load <= records[1] and rows["lru/plan"]["speed_target"] > 1


def test_bench_offload_host_compute_row_and_copies_in_flight(tmp_path, capsys):
    argv = ["bench", "offload", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--capacities", "25",
            "--tier", "cpu", "--cpu-compute-on-miss", "always", "--predictors", "gate_lookahead",
            "--copies-in-flight", "1", "--fit-prompts", "2", "--max-tokens", "3", "--repeats", "1",
            "--torch-threads", "1", "--no-progress", "--json"]
    rows = {r["config"]: r for r in _run_json(argv, capsys)["results"]}
    assert list(rows) == ["resident", "naive", "lru", "lru+host", "pred+gate_lookahead"]
    host, lru = rows["lru+host"], rows["lru"]
    assert host["host_computed"] > 0 and lru["host_computed"] == 0
    assert host["mb_per_token"] < lru["mb_per_token"]  # host-computed misses copy nothing
    assert rows["pred+gate_lookahead"]["cancelled"] >= 0
    assert main(argv[:argv.index("--tier")] + argv[argv.index("--cpu-compute-on-miss"):]) == 2  # disk tier
    assert "needs --tier cpu" in capsys.readouterr().err
