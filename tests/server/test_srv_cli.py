"""`moe-rt serve` and `moe-rt bench serve` reject bad input with one line and exit 2, before binding a port."""
from moe_rt.bench import serve as bench_serve
from server import cli_serve


def test_serve_rejects_a_folder_without_a_model(tmp_path, capsys):
    assert cli_serve.main(["--model", str(tmp_path), "--port", "0"]) == 2
    assert f"{tmp_path} is not a model folder" in capsys.readouterr().err


def test_serve_rejects_a_bad_engine_option(mixtral_dir, capsys):
    assert cli_serve.main(["--model", str(mixtral_dir), "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_bench_serve_rejects_bad_counts(mixtral_dir, capsys):
    assert bench_serve.main(["--model", str(mixtral_dir), "--clients", "0"]) == 2
    assert "--clients must be >= 1" in capsys.readouterr().err


def test_serve_offload_flags_are_validated_before_binding(mixtral_dir, capsys):
    from server import cli_serve

    assert cli_serve.main(["--model", str(mixtral_dir), "--offload", "disk", "--expert-cache-slots", "0"]) == 2
    assert "capacity_slots" in capsys.readouterr().err
    assert cli_serve.main(["--model", str(mixtral_dir), "--ep", "2", "--offload", "cpu", "--expert-cache-slots", "2",
                           "--port", "0"]) == 2
    assert "--ep does not combine" in capsys.readouterr().err
