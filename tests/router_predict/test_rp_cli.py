import argparse
import json

import numpy as np
import pytest

from moe_rt.errors import MoeRtError
from moe_rt_app.cli import eval_predictor as cli_eval, train_predictor as cli_train
from router_predict.trace import save_trace
from rp_helpers import make_trace, perm_chain_trace


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def run_cli(module, argv):
    """Mimics moe_rt_app.cli.main: MoeRtError -> one line on stderr, exit 2."""
    try:
        return module.run(parse(module, argv)), ""
    except MoeRtError as e:
        return 2, str(e)


def test_eval_table_json_and_plot(tmp_path, capsys):
    trace, _ = perm_chain_trace(80, 3, 8, 2, num_seqs=8)
    save_trace(tmp_path / "t.npz", trace)
    rc, _ = run_cli(cli_eval, ["--trace", str(tmp_path / "t.npz"), "--predictor", "frequency,coactivation",
                               "--depth", "2", "--plot", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "coactivation" in out and "recall@k" in out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    rc, _ = run_cli(cli_eval, ["--trace", str(tmp_path / "t.npz"), "--predictor", "coactivation", "--json",
                               "--fit-on", str(tmp_path / "t.npz")])
    body = json.loads(capsys.readouterr().out)
    assert rc == 0 and body["predictors"][0]["by_distance"]["1"]["recall"] == 1.0


def test_train_then_eval_path(tmp_path, capsys):
    tokens = np.arange(60) % 6
    ids = np.stack([tokens % 4, (tokens + 1) % 4], -1)[:, None, :].repeat(2, 1)
    save_trace(tmp_path / "t.npz", make_trace(ids, 4, token_ids=tokens, seq_ids=np.arange(60) % 6))
    rc, _ = run_cli(cli_train, ["--trace", str(tmp_path / "t.npz"), "--out", str(tmp_path / "p"),
                                "--kind", "path", "--epochs", "2"])
    assert rc == 0 and "held-out loss" in capsys.readouterr().out
    rc, _ = run_cli(cli_eval, ["--trace", str(tmp_path / "t.npz"), "--predictor", "path",
                               "--predictor-dir", str(tmp_path / "p")])
    assert rc == 0 and "path" in capsys.readouterr().out


@pytest.mark.parametrize("module, extra, expected", [
    (cli_eval, ["--predictor", "frequency"], "not a readable .npz"),
    (cli_train, ["--out", "x"], "not a readable .npz"),
])
def test_bad_trace_exits_2_with_one_line(tmp_path, module, extra, expected):
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    rc, msg = run_cli(module, ["--trace", str(tmp_path / "bad.npz"), *extra])
    assert rc == 2 and expected in msg and "\n" not in msg


def test_eval_predictor_input_errors(tmp_path):
    save_trace(tmp_path / "t.npz", perm_chain_trace(20, 2, 4, 1)[0])
    rc, msg = run_cli(cli_eval, ["--trace", str(tmp_path / "t.npz"), "--predictor", "learned"])
    assert rc == 2 and "hidden states to train on" in msg
    rc, msg = run_cli(cli_eval, ["--trace", str(tmp_path / "t.npz"), "--predictor", "gate_lookahead"])
    assert rc == 2 and "--model" in msg
    rc, msg = run_cli(cli_train, ["--trace", str(tmp_path / "t.npz"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "hidden states" in msg
