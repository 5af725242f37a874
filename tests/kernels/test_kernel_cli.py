"""The kernel benchmark and tuner entry points behave on a machine without a GPU."""
import argparse
import json

import pytest
import torch

from moe_rt_app.bench import kernel as bench_kernel
from moe_rt.kernels import tune

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_kernel.add_arguments(parser)
    return parser.parse_args(list(argv))


@no_cuda
def test_bench_without_gpu_exits_2(capsys):
    assert bench_kernel.run(parse()) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and err.count("\n") == 1


@no_cuda
def test_bench_interpret_smoke_checks_against_reference(capsys):
    assert bench_kernel.run(parse("--interpret-smoke", "--json", "--dtype", "fp32")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["rows"]) == 2
    assert all(r["rel_err"] <= 1e-4 for r in report["rows"])
    assert not any("ms" in key for r in report["rows"] for key in r)  # no speed claims


@no_cuda
def test_tuner_without_gpu_exits_2(capsys):
    assert tune.main(["--experts", "8", "--inter", "64", "--hidden", "32"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and err.count("\n") == 1


def test_tuner_candidates_respect_padding_bound():
    decode = tune.candidate_configs(1, 2, 8)
    assert {c["BLOCK_SIZE_M"] for c in decode} == {16}
    prefill = tune.candidate_configs(256, 2, 8)
    assert {c["BLOCK_SIZE_M"] for c in prefill} == {16, 32, 64, 128}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU plumbing check; the GPU runs the real bench")
def test_bench_rows_bookkeeping_with_stub_timer():
    calls = []

    def stub_timer(fn, *, warmup, iters, reduce):  # runs the step once; the figures are placeholders
        fn()
        calls.append(1)
        return reduce([2.0, 1.5, 3.0] if len(calls) % 2 else [6.0])  # fused, then loop

    def stub_graph_timer(fn, *, warmup, iters, reduce):
        fn()
        return reduce([1.0])

    shape = bench_kernel.LayerShape("tiny", 4, 32, 16, 2)
    rows, bw = bench_kernel._bench_cuda([shape], [1, 3], torch.float32, parse("--repeats", "1"),
                                        device="cpu", timer=stub_timer, graph_timer=stub_graph_timer,
                                        bandwidth=1.0)
    assert bw == 1.0 and [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert 1 <= r["experts_hit"] <= min(4, r["batch"] * 2)
        assert r["weight_bytes"] == r["experts_hit"] * (2 * 16 * 32 + 32 * 16) * 4
        assert r["speedup"] == 3.0  # of the medians
        assert r["fused_ms_best"] == 1.5 and r["loop_ms_best"] == 6.0
        assert r["floor_frac"] == pytest.approx(r["weight_bytes"] / 1e9 * 1e3 / 2.0)
        assert r["graph_ms"] == 1.0 and r["graph_floor_frac"] == pytest.approx(2 * r["floor_frac"])
    rows, _ = bench_kernel._bench_cuda([shape], [2], torch.float32, parse("--repeats", "1", "--no-graph"),
                                       device="cpu", timer=stub_timer, bandwidth=1.0)
    assert rows[0]["graph_ms"] is None and rows[0]["graph_floor_frac"] is None and rows[0]["graph_ms_best"] is None
