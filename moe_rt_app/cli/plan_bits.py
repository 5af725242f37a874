"""`moe-rt plan-bits`: write a per-expert bitwidth plan from a routing trace (EdgeMoE's idea: the
experts a model uses most keep more bits).

Counts how often each expert of each MoE layer was chosen in the trace and gives the hottest ones
--hot-bits, the rest --cold-bits: per layer the --hot-fraction most-activated experts, or, with
--budget-bytes, the most-activated experts of the whole model that fit the budget. Prints the
experts per width and the expert bytes against uniform widths (the real bytes a CPU store holds,
docs/quantization.md). The plan is used with `--expert-bits PLAN` or `engine.expert_bits_plan`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_rt.errors import MoeRtError
from moe_rt_app.cli.args import float_in, output_file, positive_int


def width(text: str):
    from moe_rt.quant.plan import parse_width

    try:
        return parse_width(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, metavar="T.npz", help="routing trace (.npz, moe-rt trace)")
    p.add_argument("--out", required=True, type=output_file, metavar="plan.yaml", help="where to write the plan")
    p.add_argument("--model", help="model folder for expert sizes and range checks (default: the trace's "
                                   "model when that folder exists, else the shipped demo model)")
    p.add_argument("--hot-fraction", type=float_in(0, 1), default=0.25,
                   help="share of each layer's experts, most-activated first, given --hot-bits (default 0.25)")
    p.add_argument("--budget-bytes", type=positive_int, default=None,
                   help="instead of --hot-fraction: raise the model's most-activated experts to --hot-bits "
                        "while the expert bytes stay within this")
    p.add_argument("--hot-bits", type=width, default=8, metavar="{8,full}", help="width of hot experts (default 8)")
    p.add_argument("--cold-bits", type=width, default=4, metavar="{8,4}", help="width of the rest (default 4)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64,
                   help="int4 input columns per scale and zero (default 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype for the byte counts of full-precision experts (default float32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def model_folder(args, trace_model: str) -> str:
    from moe_rt.checkpoint import default_model_dir

    if args.model:
        return args.model
    if trace_model and (Path(trace_model) / "config.json").is_file():
        return trace_model
    return str(default_model_dir())


def expert_counts(topk_ids, num_experts: int, progress: bool) -> list[list[int]]:
    """topk_ids [N, L, k] -> activations [L][E] (ids < 0, choices dropped at run time, skipped)."""
    import numpy as np
    from tqdm import tqdm

    L = topk_ids.shape[1]
    out = []
    for l in tqdm(range(L), desc="Counting", disable=not progress, leave=False):
        ids = topk_ids[:, l].ravel()
        out.append(np.bincount(ids[ids >= 0], minlength=num_experts).tolist())
    return out


def label(w) -> str:
    return "full precision" if w == "full" else f"{w} bits"


def activation_share(counts: list[list[int]], plan) -> float:
    """The share of the traced activations that went to experts the plan keeps wider than its default."""
    total = sum(map(sum, counts))
    wide = sum(counts[l][e] for l, ws in plan.layers.items() for w, ids in ws.items() if w != plan.default for e in ids)
    return wide / total if total else 0.0


def run(args) -> int:
    import sys

    import torch

    from moe_rt.loader import load_spec
    from moe_rt.quant.mixed import bytes_per_expert
    from moe_rt.quant.plan import WIDTHS, plan_by_budget, plan_by_fraction
    from router_predict.trace import load_trace

    if args.hot_bits == args.cold_bits or WIDTHS.index(args.hot_bits) > WIDTHS.index(args.cold_bits):
        raise MoeRtError(f"--hot-bits {args.hot_bits} must be wider than --cold-bits {args.cold_bits}")
    trace = load_trace(args.trace)
    model = model_folder(args, trace.meta.model)
    spec = load_spec(model)
    L, E = len(spec.moe_layer_ids), spec.num_experts
    if (trace.num_layers, trace.num_experts) != (L, E):
        raise MoeRtError(f"trace {args.trace} has {trace.num_layers} MoE layers x {trace.num_experts} experts "
                         f"but model {model} has {L} x {E}; pass the trace's --model")
    counts = expert_counts(trace.topk_ids, E, progress=not args.no_progress and sys.stderr.isatty())
    dtype = getattr(torch, args.dtype)
    nbytes = {w: bytes_per_expert(spec.hidden_size, spec.moe.intermediate_size, w, args.group_size, dtype)
              for w in WIDTHS}
    if args.budget_bytes is not None:
        plan = plan_by_budget(counts, args.budget_bytes, nbytes, args.hot_bits, args.cold_bits, args.group_size)
        rule = f"the model's most-activated experts within {args.budget_bytes} expert bytes"
    else:
        plan = plan_by_fraction(counts, args.hot_fraction, args.hot_bits, args.cold_bits, args.group_size)
        rule = f"each layer's {round(args.hot_fraction * E)} of {E} most-activated experts"
    plan.check_model(L, E)
    per_width = plan.counts(L, E)
    total = sum(n * nbytes[w] for w, n in zip(WIDTHS, per_width.values()))
    uniform = {str(w): L * E * nbytes[w] for w in WIDTHS}
    hot_share = activation_share(counts, plan)
    header = (f"Bits plan written by moe-rt plan-bits from trace {args.trace}\n"
              f"({trace.num_rows} tokens, model {model}): {rule} at {label(args.hot_bits)},\n"
              f"the rest at {label(args.cold_bits)}; they took {100 * hot_share:.1f}% of the traced activations.\n"
              f"Experts per width: " + ", ".join(f"{w} {n}" for w, n in per_width.items())
              + f"; expert bytes {total} ({args.dtype} compute, CPU store).")
    Path(args.out).write_text(plan.to_yaml(header), encoding="utf-8")
    summary = {"out": args.out, "tokens": trace.num_rows, "experts_per_width": per_width, "hot_share": hot_share,
               "expert_bytes": total, "uniform_expert_bytes": uniform}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"wrote {args.out}: {L} MoE layers x {E} experts from {trace.num_rows} traced tokens")
    print("experts per width: " + ", ".join(f"{w}: {n}" for w, n in per_width.items())
          + f"; the wider ones took {100 * hot_share:.1f}% of the traced activations")
    print(f"expert bytes: {total / 2**20:.2f} MiB; uniform " + ", ".join(
        f"{w}: {b / 2**20:.2f} MiB ({total / b:.2f}x)" for w, b in uniform.items()))
    return 0
