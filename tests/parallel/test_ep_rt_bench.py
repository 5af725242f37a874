"""bench ep end to end on 2 ranks (subprocess ranks, the path users take): lossless and consistent."""
import json

from moe_rt_app.cli.main import main
from moe_rt_app.bench.ep import format_report


def test_bench_ep_two_ranks_synthetic(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "ep", "--synthetic", "mixtral-ep-tiny", "--cache-dir", str(tmp_path), "--ranks", "2", "--repeats", "2",
            "--prompts", "2", "--prompt-len", "8", "--max-tokens", "3", "--schemes", "baseline,s-TS+s-EG", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rep = json.loads(out[out.index("{"):])
    assert rep["lossless"] is True
    rows = rep["schemes"]
    assert set(rows) == {"baseline", "s-TS+s-EG"}
    base = rows["baseline"]
    assert base["a2a_vs_baseline"] == base["all_vs_baseline"] == base["step_ms_vs_baseline"] == 1.0
    assert "NOT LOSSLESS" not in format_report(rep) and "vs base" in format_report(rep)
    for r in rows.values():
        assert r["same_tokens_as_baseline"]
        assert 0 < r["step_ms_best"] <= r["step_ms"]
        assert 0 < r["a2a_bytes_per_token"] <= r["all_bytes_per_token"]
        moved = sum(r["bytes_by_collective"].values())
        assert abs(moved / r["tokens"] - r["all_bytes_per_token"]) < 0.1


def test_bench_ep_refuses_indivisible_heads_before_starting_ranks(mixtral_dir, capsys):
    # the tiny model has 4 heads and 2 KV heads: 4 ranks cannot split the KV heads
    assert main(["bench", "ep", "--model", str(mixtral_dir), "--ranks", "4"]) == 2
    err = capsys.readouterr().err
    assert "divisible by 4" in err and len(err.strip().splitlines()) == 1
