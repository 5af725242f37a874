"""Perplexity and expert evaluations under dynamic top-k, on held-out text.

    python scripts/dynamic_topk_perplexity.py [--model DIR] [--prompts FILE] [--threshold 0.1,0.2]
        [--top-p 0.8,0.9]

Scores every line of the prompt file (default data/prompts/kjv-heldout.txt, books the demo model
was not trained on) with LLM.prompt_logits: the mean negative log-likelihood of each next token
given the line before it, exponentiated. Each setting is a fresh engine with dynamic top-k set
(EngineConfig.dynamic_topk_threshold / dynamic_topk_top_p); its expert evaluations per token per
MoE layer come from moe_stats()["routing"]. Printed beside the unpruned model's figures.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def score(model: str, lines: list[str], **dyn) -> dict:
    from moe_rt_app import LLM

    llm = LLM(model, dtype="float32", device="cpu", progress=False, **dyn)
    nll, n = 0.0, 0
    for line in lines:
        ids = llm.engine.encode_prompt(line)
        if len(ids) < 2:
            continue
        logp = torch.log_softmax(llm.prompt_logits(ids), dim=-1)
        nll -= logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        n += len(ids) - 1
    routing = llm.engine.moe_stats().get("routing")
    top_k = llm.model.spec.top_k
    llm.close()
    return {"ppl": math.exp(nll / n), "tokens": n,
            "experts_per_token": routing["experts_per_token"] if routing else float(top_k)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "moe_rt" / "demo_model"))
    p.add_argument("--prompts", default=str(ROOT / "data" / "prompts" / "kjv-heldout.txt"))
    p.add_argument("--threshold", default="0.1,0.2,0.3")
    p.add_argument("--top-p", default="0.7,0.8,0.9")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    lines = [l for l in Path(args.prompts).read_text(encoding="utf-8").splitlines() if l.strip()]
    settings = [{}] + [{"dynamic_topk_threshold": float(t)} for t in args.threshold.split(",") if t] \
        + [{"dynamic_topk_top_p": float(t)} for t in args.top_p.split(",") if t]
    rows = []
    for dyn in settings:
        r = score(args.model, lines, **dyn)
        rows.append({"setting": ", ".join(f"{k.removeprefix('dynamic_topk_')}={v}" for k, v in dyn.items()) or "off", **r})
    base = rows[0]
    for r in rows:
        r["evaluations_vs_off"] = r["experts_per_token"] / base["experts_per_token"]
        r["ppl_vs_off"] = r["ppl"] / base["ppl"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{len(lines)} lines, {base['tokens']} scored tokens")
    print(f"{'setting':<16} {'ppl':>8} {'ppl/off':>8} {'experts/token':>13} {'evals/off':>9}")
    for r in rows:
        print(f"{r['setting']:<16} {r['ppl']:>8.3f} {r['ppl_vs_off']:>8.4f} {r['experts_per_token']:>13.3f} "
              f"{r['evaluations_vs_off']:>9.3f}")


if __name__ == "__main__":
    main()
