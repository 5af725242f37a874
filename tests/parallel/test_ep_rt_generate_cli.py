"""`moe-rt generate --ep 2` launches two gloo ranks and prints what the single process prints."""
from moe_rt_app.cli.main import main


def test_generate_ep2_equals_single_process(mixtral_dir, capsys):
    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "6",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--no-stream"]
    assert main(base) == 0
    single = capsys.readouterr().out
    assert main(base + ["--ep", "2", "--ep-dispatcher", "speculative"]) == 0
    assert capsys.readouterr().out == single
    assert main(base + ["--ep", "0"]) == 2
    assert "--ep must be >= 1" in capsys.readouterr().err


def test_generate_ep2_takes_quantized_experts(mixtral_dir, capsys):
    """--expert-bits reaches every rank: the ranks print what the single quantized process prints,
    which differs from the full-precision output."""
    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "6",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--no-stream"]
    quant = ["--expert-bits", "4", "--group-size", "32"]
    assert main(base) == 0
    full = capsys.readouterr().out
    assert main(base + quant) == 0
    single = capsys.readouterr().out
    assert single != full
    assert main(base + quant + ["--ep", "2"]) == 0
    assert capsys.readouterr().out == single
