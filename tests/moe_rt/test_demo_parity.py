"""The shipped demo model: the default of LLM() and the CLI, and identical to transformers."""
import subprocess
import sys

import torch

from moe_rt.checkpoint import DEMO_MODEL_DIR


def test_demo_model_is_the_default_and_matches_transformers():
    from transformers import AutoModelForCausalLM

    from moe_rt_app import LLM, SamplingParams

    llm = LLM(dtype="float32", device="cpu", progress=False)
    assert llm.config.model == str(DEMO_MODEL_DIR)
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode("In the beginning God created the heaven and the earth.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (llm.prompt_logits(ids) - ref).abs().max().item() < 1e-4
    out = llm.generate("In the beginning", SamplingParams(max_tokens=24, temperature=0))[0]
    with torch.no_grad():
        g = hf.generate(torch.tensor([llm.tokenizer.encode("In the beginning")]), max_new_tokens=24, do_sample=False)
    hf_ids = g[0, len(llm.tokenizer.encode("In the beginning")):].tolist()
    assert out.token_ids == hf_ids[: len(out.token_ids)]
    words = out.text.lower().split()
    assert sum(w.strip(",.;:") in {"the", "and", "of", "god", "lord", "in", "unto", "he"} for w in words) >= 3


def test_console_script_generates_from_the_demo_model():
    exe = [sys.executable, "-m", "moe_rt_app.cli.main"]
    r = subprocess.run(exe + ["generate", "--prompt", "In the beginning", "--max-tokens", "8", "--temperature", "0",
                              "--no-stream", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    r = subprocess.run(exe + ["generate", "--prompt", "x", "--max-tokens", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--max-tokens" in r.stderr
