"""`moe-rt eval-ppl`: perplexity of a model over a text file (moe_rt/eval/perplexity.py); with
--expert-bits, the same model with quantized experts beside the full-precision one, and the
fraction of positions where their greedy choices agree."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moe_rt.checkpoint import DEMO_MODEL_DIR
from moe_rt.errors import MoeRtError
from moe_rt_app.cli.args import positive_int
from moe_rt_app.cli.flags import add_model_arguments, build_llm

# The demo model's held-out verses (Hebrews..Revelation, docs/demo-model.md), in a source checkout.
DEMO_HELDOUT = Path(__file__).resolve().parents[2] / "data" / "prompts" / "kjv-heldout.txt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="UTF-8 text file to score (default for the demo model, in a source checkout: "
                                  "data/prompts/kjv-heldout.txt, verses of its held-out books)")
    p.add_argument("--window", type=positive_int, default=256,
                   help="tokens per scoring window, BOS included (capped by the context; default 256)")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def default_text(model: str | None) -> Path:
    is_demo = model is None or Path(model).resolve() == DEMO_MODEL_DIR.resolve()
    if is_demo and DEMO_HELDOUT.is_file():
        return DEMO_HELDOUT
    raise MoeRtError("--text FILE is required: there is no default text for this model here "
                     "(the demo model's is data/prompts/kjv-heldout.txt of a source checkout)")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoeRtError(f"cannot read --text {path}: {getattr(e, 'strerror', None) or e}") from None


def run(args) -> int:
    from moe_rt.eval.perplexity import greedy_agreement, score_text

    path = Path(args.text) if args.text else default_text(args.model)
    text = read_text(path)
    sides = {"full": argparse.Namespace(**{**vars(args), "expert_bits": None})}
    if args.expert_bits is not None:
        sides[f"int{args.expert_bits}"] = args
    results, scores = {}, {}
    for name, side_args in sides.items():
        llm = build_llm(side_args)
        t = time.perf_counter()
        score = score_text(llm.engine, text, args.window)
        results[name] = {"perplexity": score.perplexity, "tokens": score.tokens,
                         "seconds": round(time.perf_counter() - t, 2)}
        scores[name] = score
        llm.close()
    out = {"text": str(path), "window": args.window, "results": results}
    if args.expert_bits is not None:
        q = f"int{args.expert_bits}"
        out["expert_group_size"] = (args.expert_group_size or 64) if args.expert_bits == 4 else None
        out["perplexity_change"] = results[q]["perplexity"] / results["full"]["perplexity"] - 1
        out["greedy_agreement"] = greedy_agreement(scores["full"], scores[q])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"text: {path} ({results['full']['tokens']} predicted tokens, windows of {args.window})")
    for name, r in results.items():
        print(f"{name:>5}: perplexity {r['perplexity']:.3f}")
    if args.expert_bits is not None:
        print(f"perplexity change {100 * out['perplexity_change']:+.2f}%, "
              f"greedy agreement {100 * out['greedy_agreement']:.2f}%")
    return 0
