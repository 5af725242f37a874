"""`moe-rt eval-ppl`: perplexity of a model over a text file (moe_rt/eval/perplexity.py); with
--expert-bits 8|4|PLAN (or the config file's engine section), the same model with quantized experts
beside the full-precision one, and the fraction of positions where their greedy choices agree."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moe_rt.checkpoint import DEMO_MODEL_DIR
from moe_rt.errors import MoeRtError
from moe_rt_app.cli.args import positive_int
from moe_rt_app.cli.flags import add_model_arguments, build_llm, config_from_args

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


def quantized_side(engine) -> str | None:
    """The name of the quantized side the engine section asks for (None: full precision only)."""
    if engine.expert_bits_plan is not None:
        return "plan"
    return None if engine.expert_bits is None else f"int{engine.expert_bits}"


def run(args) -> int:
    from moe_rt.eval.perplexity import greedy_agreement, score_text

    path = Path(args.text) if args.text else default_text(args.model)
    text = read_text(path)
    cfg = config_from_args(args)  # --expert-bits, or the config file's engine section
    eng = cfg.engine
    q = quantized_side(eng)
    full = eng.model_copy(update={"expert_bits": None, "expert_bits_plan": None})
    # The quantized side loads first: a plan or group size the model refuses fails before any scoring.
    sides = {q: cfg} if q is not None else {}
    sides["full"] = cfg.model_copy(update={"engine": full})
    results, scores = {}, {}
    for name, side_cfg in sides.items():
        llm = build_llm(args, side_cfg)
        t = time.perf_counter()
        score = score_text(llm.engine, text, args.window)
        store = llm.model.moe_ctx.store
        results[name] = {"perplexity": score.perplexity, "tokens": score.tokens,
                         "seconds": round(time.perf_counter() - t, 2), "expert_bytes": store.expert_bytes(),
                         "expert_bytes_by_width": store.bytes_by_width()}
        scores[name] = score
        llm.close()
    results = {name: results[name] for name in ("full", q) if name}
    out = {"text": str(path), "window": args.window, "results": results}
    if q is not None:
        plan = eng.expert_bits_plan
        group = (plan.group_size if plan is not None else None) or eng.expert_group_size
        uses_int4 = eng.expert_bits == 4 or (plan is not None and "4" in results[q]["expert_bytes_by_width"])
        out["expert_group_size"] = group if uses_int4 else None
        out["perplexity_change"] = results[q]["perplexity"] / results["full"]["perplexity"] - 1
        out["greedy_agreement"] = greedy_agreement(scores["full"], scores[q])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"text: {path} ({results['full']['tokens']} predicted tokens, windows of {args.window})")
    for name, r in results.items():
        widths = ", ".join(f"{w}: {b / 2**20:.1f}" for w, b in r["expert_bytes_by_width"].items())
        print(f"{name:>5}: perplexity {r['perplexity']:.3f}, expert MiB {r['expert_bytes'] / 2**20:.1f} ({widths})")
    if q is not None:
        print(f"perplexity change {100 * out['perplexity_change']:+.2f}%, "
              f"greedy agreement {100 * out['greedy_agreement']:.2f}%")
    return 0
