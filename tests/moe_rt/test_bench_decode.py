"""bench decode plumbing on a tiny synthetic model: both sides measured, ratio and floor reported;
the repeat rule every bench shares."""
import json

from moe_rt.bench.common import Repeats, repeat_stats
from moe_rt.cli import main


def test_bench_decode_reports_ratio_and_floor(tmp_path, capsys):
    argv = ["bench", "decode", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--batch-sizes", "1,3",
            "--max-tokens", "4", "--prompt-len", "5", "--repeats", "2", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{"):])
    assert [r["batch"] for r in res["results"]] == [1, 3]
    for r in res["results"]:
        assert r["moe_rt_tok_s"] > 0 and r["hf_tok_s"] > 0
        assert abs(r["ratio"] - r["moe_rt_tok_s"] / r["hf_tok_s"]) < 1e-9
        assert r["moe_rt_tok_s_best"] >= r["moe_rt_tok_s"] and r["hf_tok_s_best"] >= r["hf_tok_s"]
        assert abs(r["ratio_best"] - r["moe_rt_tok_s_best"] / r["hf_tok_s_best"]) < 1e-9
        assert 0 < r["floor_ms"] and 0 < r["floor_share"]
    assert res["bandwidth_GBps"] > 0
    assert (tmp_path / "mixtral-tiny" / "config.json").is_file()


def test_bench_decode_bad_arguments(capsys):
    assert main(["bench", "decode", "--synthetic", "nope"]) == 2
    assert "unknown synthetic model" in capsys.readouterr().err
    assert main(["bench", "decode", "--synthetic", "mixtral-tiny", "--batch-sizes", "a,b"]) == 2
    assert main(["bench", "nosuch"]) == 2
    try:  # argparse's own error: exit status 2 whether main returns it or exits with it
        code = main(["bench", "decode", "--repeats", "0"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--repeats" in capsys.readouterr().err


def test_repeat_rule_is_median_and_fastest():
    assert repeat_stats([3.0, 1.0, 2.0, 10.0]) == Repeats(median=2.5, best=1.0)
    assert repeat_stats([4.0]) == Repeats(4.0, 4.0)
