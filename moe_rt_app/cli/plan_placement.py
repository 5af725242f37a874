"""`moe-rt plan-placement`: plan an s-EG expert placement from a routing trace and write its YAML.

Prints the planned placement's local share and all-to-all traffic next to DeepSpeed's default
placement on the same trace. That comparison is in-sample (the planner saw these tokens); use
`moe-rt simulate-ep`, which plans and measures on different sequences, for an honest estimate.
"""
from __future__ import annotations

import argparse
import json
import sys

from moe_rt_app.cli.args import float_in, int_in, output_file, positive_int
from parallel.grouping import GroupingOptions, plan_expert_groups
from parallel.placement import default_placement, save_placement_yaml
from parallel.traffic import TrafficOptions, compare_schemes, ratio
from router_predict.trace import Trace, load_trace


def add_grouping_arguments(parser: argparse.ArgumentParser) -> None:
    """Planner and size flags shared with simulate-ep."""
    parser.add_argument("--replicas", type=int_in(0), default=0, metavar="R",
                        help="extra copy of each layer's R hottest experts (default 0)")
    parser.add_argument("--load-tolerance", type=float_in(), default=0.1, metavar="F",
                        help="a rank may carry at most (1+F) x the mean token load; negative "
                             "means count balance only (default 0.1)")
    parser.add_argument("--cross-layer-weight", type=float_in(0), default=1.0, metavar="W",
                        help="weight of keeping experts on the rank of the previous layer's "
                             "experts, relative to grouping one layer's experts (default 1.0)")
    parser.add_argument("--hidden", type=positive_int, default=None, metavar="H",
                        help="model hidden size for byte counts (default: from the trace's "
                             "hidden states, else rows only)")
    parser.add_argument("--dtype-bytes", type=positive_int, default=2, metavar="B",
                        help="bytes per activation element (default 2, bf16)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, metavar="T.npz", help="routing trace (.npz)")
    parser.add_argument("--ranks", required=True, type=positive_int, metavar="N",
                        help="expert-parallel ranks; must divide the number of experts")
    parser.add_argument("--out", required=True, type=output_file, metavar="placement.yaml",
                        help="where to write the expert_parallel: section")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_grouping_arguments(parser)


def grouping_options(args: argparse.Namespace, ranks: int) -> GroupingOptions:
    tol = args.load_tolerance if args.load_tolerance >= 0 else None
    return GroupingOptions(ranks=ranks, replicas=args.replicas, cross_layer_weight=args.cross_layer_weight,
                           load_tolerance=tol)


def hidden_size(args: argparse.Namespace, trace: Trace) -> int | None:
    """--hidden, else the width of the trace's recorded router inputs, else None."""
    if args.hidden is not None:
        return args.hidden
    return int(trace.hidden.shape[-1]) if trace.hidden is not None else None


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    placement = plan_expert_groups(trace.topk_ids, trace.num_experts,
                                   grouping_options(args, args.ranks))
    save_placement_yaml(args.out, placement)
    default = default_placement(trace.num_layers, trace.num_experts, args.ranks)
    hidden = hidden_size(args, trace)
    # With no hidden size, count rows: bytes per token then reads as rows per token.
    opts = TrafficOptions(hidden=hidden or 1, dtype_bytes=args.dtype_bytes if hidden else 1)
    reports = compare_schemes(trace.topk_ids, default, placement, opts, batch_ids=trace.steps)
    unit = "bytes" if hidden else "rows"
    summary = {
        "out": args.out, "ranks": args.ranks, "replicas": placement.num_replicas(),
        "unit": unit, "hidden": hidden, "in_sample": True,
        "local_share": {"default": reports["baseline"].local_share,
                        "s-EG": reports["s-EG"].local_share,
                        "s-TS default": reports["s-TS"].local_share,
                        "s-TS s-EG": reports["s-TS+s-EG"].local_share},
        "a2a_per_token": {"default": reports["baseline"].a2a_bytes_per_token,
                          "s-EG": reports["s-EG"].a2a_bytes_per_token,
                          "s-TS default": reports["s-TS"].a2a_bytes_per_token,
                          "s-TS s-EG": reports["s-TS+s-EG"].a2a_bytes_per_token},
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    a2a, local = summary["a2a_per_token"], summary["local_share"]
    print(f"wrote {args.out}: {trace.num_layers} layers x {trace.num_experts} experts on "
          f"{args.ranks} ranks, {placement.num_replicas()} replicas")
    print(f"in-sample on {trace.num_rows} tokens (use simulate-ep for held-out numbers):")
    # s-EG is meant to work with s-TS (tokens go where their experts are); with evenly split
    # tokens it mostly saves visits by keeping a token's experts on one rank.
    for label, key in (("tokens split evenly", ""), ("tokens shuffled (s-TS)", "s-TS ")):
        print(f"  {label}:")
        print(f"    local share          default {local[key + 'default']:.3f}   "
              f"s-EG {local[key + 's-EG']:.3f}")
        print(f"    all-to-all {unit}/token  default {a2a[key + 'default']:.1f}   "
              f"s-EG {a2a[key + 's-EG']:.1f}   "
              f"ratio {ratio(a2a[key + 's-EG'], a2a[key + 'default']):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m ...`), the same as `moe-rt plan-placement`."""
    from moe_rt_app.cli.main import standalone

    return standalone("plan-placement", argv)


if __name__ == "__main__":
    sys.exit(main())
