"""The `moe-rt` command line: flag ranges, the version, error lines, closed pipes, output folders,
the generate summary and --json, and the BOS of chat prompts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_rt_app.cli import main as cli
from moe_rt_app.cli.main import main
from moe_rt.errors import MoeRtError
from moe_rt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-rt: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["serve", "--port", "http"], "--port must be an integer, got 'http'"),
    (["serve", "--max-body-bytes", "-5"], "--max-body-bytes must be >= 1, got -5"),
    (["serve", "--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["serve", "--max-model-len", "1"], "--max-model-len must be >= 2, got 1"),
    (["serve", "--kv-cache-memory-gb", "inf"], "--kv-cache-memory-gb must be a finite number > 0, got inf"),
    (["serve", "--log-stats-interval", "-1"], "--log-stats-interval must be a finite number >= 0"),
    (["serve", "--api-key", ""], "--api-key must be a non-empty key"),
    (["serve", "--expert-cache-slots", "0"], "--expert-cache-slots must be >= 1, got 0"),
    (["serve", "--lookahead", "0"], "--lookahead must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--ep", "0"], "--ep must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number in [0, 2], got nan"),
    (["generate", "--prompt", "x", "--temperature", "2.5"], "--temperature must be a finite number in [0, 2]"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p must be a finite number in (0, 1], got 0"),
    (["generate", "--prompt", "x", "--min-p", "1.5"], "--min-p must be a finite number in [0, 1]"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
    (["generate", "--prompt", "x", "--presence-penalty", "3"], "--presence-penalty must be a finite number in [-2, 2]"),
    (["generate", "--prompt", "x", "--seed", str(2**63)], f"--seed must be in {-2**63}..{2**63 - 1}, got {2**63}"),
    (["generate", "--prompt", "x", "--expert-compute", "cuda"], "--expert-compute invalid choice: 'cuda'"),
    (["train-predictor", "--epochs", "0", "--trace", "t.npz", "--out", "o"], "--epochs must be >= 1, got 0"),
    (["plan-placement", "--ranks", "0", "--trace", "t.npz", "--out", "p.yaml"], "--ranks must be >= 1, got 0"),
    (["generate"], "the following arguments are required: --prompt"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, argv, message):
    assert main(argv) == 2
    assert message in one_error(capsys)


def test_version(capsys):
    from importlib.metadata import version

    for argv in (["--version"], ["version"]):
        assert main(argv) == 0
        assert capsys.readouterr().out == f"moe-rt {version('moe-rt')}\n"
    assert main(["--help"]) == 0
    assert "--version" in capsys.readouterr().out


def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch, capsys):
    def broken(args):
        raise ValueError("a bug\nover two lines")

    monkeypatch.setattr(cli, "_load", lambda spec: (lambda p: None, broken))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["info"]) == 1
    line = one_error(capsys)
    assert "ValueError: a bug | over two lines" in line and f"{cli.DEBUG_ENV}=1" in line
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="a bug"):
        main(["info"])


def test_a_closed_stdout_ends_quietly(mixtral_dir):
    """`moe-rt info | head -1` with the reader gone before the first write: no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(cli.DEBUG_ENV, None)
    p = subprocess.Popen([sys.executable, "-m", "moe_rt_app.cli.main", "info", "--model", str(mixtral_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # every write now fails with EPIPE
    err = p.stderr.read().decode()
    assert p.wait(WAIT) == 1
    assert err == "", err


def test_a_corrupt_checkpoint_is_one_line(mixtral_dir, tmp_path, capsys):
    broken = tmp_path / "m"
    shutil.copytree(mixtral_dir, broken)
    (broken / "tokenizer.json").write_text("{garbage")
    assert main(["generate", "--model", str(broken), "--prompt", "x"]) == 2
    assert "tokenizer.json is not a readable tokenizer" in one_error(capsys)
    (broken / "config.json").write_text('"just a string"')
    assert main(["info", "--model", str(broken)]) == 2
    assert "config.json must hold a JSON object, got str" in one_error(capsys)


def test_errors_name_the_flags_the_user_typed(mixtral_dir, tmp_path, capsys):
    base = ["generate", "--model", str(mixtral_dir), "--prompt", "x"]
    assert main([*base, "--offload", "cpu"]) == 2
    assert one_error(capsys).endswith("give exactly one of --expert-cache-slots and --expert-cache-gb")
    assert main([*base, "--predictor-dir", str(tmp_path)]) == 2
    assert one_error(capsys).endswith("--predictor-dir needs --predictor or --track-predictor")
    assert main(["serve", "--model", str(mixtral_dir), "--port", "0", "--max-model-len", "200",
                 "--kv-cache-memory-gb", "0.00001"]) == 2
    assert "raise --kv-cache-memory-gb or lower --max-model-len" in one_error(capsys)
    # a field the placement file set keeps its YAML name
    placement = tmp_path / "placement.yaml"
    placement.write_text("cache:\n  capacity_slots: 2\n  capacity_gb: 1\n")
    assert main([*base, "--placement", str(placement)]) == 2
    assert "give exactly one of capacity_slots and capacity_gb" in one_error(capsys)


def test_output_folders_are_created(mixtral_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\nAnd God said\nLet there be light\nThe quick brown fox\nHello world\n")
    trace = tmp_path / "new" / "dir" / "t.npz"
    assert main(["trace", "--model", str(mixtral_dir), "--prompts", str(prompts), "--out", str(trace),
                 "--max-tokens", "4", "--dtype", "float32", "--device", "cpu"]) == 0
    assert trace.is_file()
    plot = tmp_path / "plots" / "deeper" / "recall.png"
    assert main(["eval-predictor", "--trace", str(trace), "--predictor", "frequency", "--plot", str(plot),
                 "--json"]) == 0
    assert plot.stat().st_size > 0
    capsys.readouterr()
    trace.with_name("a-file").write_text("")
    assert main(["eval-predictor", "--trace", str(trace), "--predictor", "frequency",
                 "--plot", str(trace.with_name("a-file") / "x.png")]) == 2
    assert "--plot cannot write" in one_error(capsys)


def test_generate_summary_and_json(mixtral_dir, capsys):
    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "6",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu"]
    assert main([*base, "--no-stream"]) == 0
    out = capsys.readouterr()
    text = out.out.rstrip("\n")
    assert out.err.startswith("moe-rt: 6 tokens in ") and "tok/s" in out.err
    assert main([*base, "--json", "--offload", "cpu", "--expert-cache-slots", "2",
                 "--track-predictor", "gate_lookahead", "--repetition-penalty", "1.0"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    doc = json.loads(out.out)  # one object: the completion and the summary
    assert doc["text"] == text and len(doc["token_ids"]) == 6 and doc["finish_reason"] == "length"
    s = doc["summary"]
    assert s["tokens"] == 6 and s["seconds"] > 0 and s["tokens_per_s"] > 0
    assert 0 <= s["cache_hit_rate"] <= 1 and s["cache_bytes_read"] > 0
    assert s["predictor"] == "gate_lookahead" and 0 <= s["predictor_recall"] <= 1
    # the same summary as one stderr line after a streamed completion
    assert main([*base, "--offload", "cpu", "--expert-cache-slots", "2", "--track-predictor", "gate_lookahead"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == text
    line = out.err.strip()
    assert "expert cache: " in line and "% hits" in line and "live recall@2" in line and "\n" not in line


def test_generate_penalties_reach_the_sampler(mixtral_dir, capsys):
    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "24",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*base, "--frequency-penalty", "2", "--presence-penalty", "2"]) == 0
    penalised = json.loads(capsys.readouterr().out)["token_ids"]
    assert len(set(plain)) < len(plain), "greedy output without repeats: the test proves nothing"
    assert penalised != plain


# -- chat prompts start with BOS exactly when plain prompts do --------------------------------------
def tokenizer_copy(src: Path, dst: Path, template: str, post_processor: bool = True) -> Tokenizer:
    dst.mkdir()
    tok = json.loads((src / "tokenizer.json").read_text())
    if not post_processor:
        tok["post_processor"] = None
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return Tokenizer(dst)


CHAT = [{"role": "user", "content": "Hello"}]
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.mark.parametrize("template", [PLAIN, "{{ bos_token }}" + PLAIN], ids=["template-without-bos", "template-with-bos"])
def test_chat_prompt_starts_with_one_bos_like_generate(mixtral_dir, tmp_path, template):
    tok = tokenizer_copy(mixtral_dir, tmp_path / "tok", template)
    bos = tok.bos_token_id
    assert tok.encode("Hello")[0] == bos  # this tokenizer adds BOS to plain prompts
    ids = tok.encode_chat(CHAT)
    assert ids[0] == bos and ids[1] != bos
    assert tok.decode(ids) == tok.decode(tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False))


def test_chat_prompt_has_no_bos_when_generate_adds_none(mixtral_dir, tmp_path):
    tok = tokenizer_copy(mixtral_dir, tmp_path / "tok", PLAIN, post_processor=False)
    assert tok.encode("Hello")[0] != tok.bos_token_id
    assert tok.encode_chat(CHAT)[0] != tok.bos_token_id


def test_llm_chat_uses_the_same_bos(tmp_path):
    """The shipped demo model's template writes no BOS; generate adds one, and so must chat."""
    from moe_rt_app import LLM, SamplingParams

    llm = LLM(dtype="float32", device="cpu", progress=False)
    out = llm.chat(CHAT, SamplingParams(max_tokens=1, temperature=0))
    bos = llm.tokenizer.bos_token_id
    assert out.prompt_token_ids[0] == bos != out.prompt_token_ids[1]
    assert llm.generate("Hello", SamplingParams(max_tokens=1))[0].prompt_token_ids[0] == bos


def test_a_template_that_raises_on_a_conversation_is_a_one_line_error(mixtral_dir, tmp_path):
    # jinja raises plain Python errors (here ZeroDivisionError) from a template's own arithmetic;
    # they must reach callers as MoeRtError (HTTP 400, CLI exit 2), not as a server bug.
    tok = tokenizer_copy(mixtral_dir, tmp_path / "tok", "{{ (messages | length) // 0 }}")
    with pytest.raises(MoeRtError, match="chat template failed on these messages: ZeroDivisionError"):
        tok.encode_chat(CHAT)
