"""Perplexity in windows and greedy agreement, against transformers' own loss on the same windows."""
import json
import math

import pytest
import torch

from checkpoints import TEXT
from moe_rt_app import LLM
from moe_rt.errors import MoeRtError
from moe_rt.eval.perplexity import greedy_agreement, score_text, token_windows


def test_windows_start_with_bos_and_cover_every_token_once():
    ids = [1, 10, 11, 12, 13, 14, 15, 16]  # BOS then 7 tokens
    assert token_windows(ids, 4, bos=1) == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16]]
    assert token_windows([10, 11, 12, 13, 14], 2, bos=None) == [[10, 11], [12, 13]]  # [14] predicts nothing
    with pytest.raises(MoeRtError, match="at least 2 tokens"):
        token_windows(ids, 1, bos=1)


def test_perplexity_matches_transformers_loss(mixtral_dir, mixtral_llm):
    from transformers import AutoModelForCausalLM

    text = TEXT * 2
    score = score_text(mixtral_llm.engine, text, window=24)
    hf = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32).eval()
    tok = mixtral_llm.tokenizer
    windows = token_windows(tok.encode(text), 24, tok.bos_token_id)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            loss = hf(ids, labels=ids).loss.item()  # mean over len(w) - 1 predictions
            nll += loss * (len(w) - 1)
            n += len(w) - 1
    assert score.tokens == n == len(tok.encode(text)) - 1
    assert math.isclose(score.perplexity, math.exp(nll / n), rel_tol=1e-4)
    assert greedy_agreement(score, score) == 1.0


def test_quantized_experts_agree_mostly(mixtral_dir, mixtral_llm):
    full = score_text(mixtral_llm.engine, TEXT, window=32)
    int4 = score_text(LLM(mixtral_dir, dtype="float32", progress=False, expert_bits=4, expert_group_size=32).engine,
                      TEXT, window=32)
    assert int4.tokens == full.tokens
    assert int4.perplexity != full.perplexity
    assert 0.5 < greedy_agreement(full, int4) <= 1.0


def test_empty_text_is_refused(mixtral_llm):
    with pytest.raises(MoeRtError, match="fewer than 2 tokens"):
        score_text(mixtral_llm.engine, "")


def test_eval_ppl_cli_compares_quantized_with_full(mixtral_dir, tmp_path, capsys):
    from moe_rt_app.cli.main import main

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    argv = ["eval-ppl", "--model", str(mixtral_dir), "--text", str(text), "--dtype", "float32", "--window", "32"]
    assert main(argv + ["--expert-bits", "4", "--group-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    full, int4 = out["results"]["full"], out["results"]["int4"]
    assert full["tokens"] == int4["tokens"] > 0
    assert math.isclose(out["perplexity_change"], int4["perplexity"] / full["perplexity"] - 1)
    assert 0.5 < out["greedy_agreement"] <= 1 and out["expert_group_size"] == 32
    # errors are one line naming the flag
    assert main(argv + ["--expert-bits", "4", "--group-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--group-size 64 does not divide the input size 96" in err
    assert main(argv[:3] + ["--dtype", "float32"]) == 2
    assert "--text FILE is required" in capsys.readouterr().err
