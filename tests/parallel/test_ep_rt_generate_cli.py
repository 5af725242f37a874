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
