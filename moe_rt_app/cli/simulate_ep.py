"""`moe-rt simulate-ep`: predicted expert-parallel traffic of baseline / s-TS / s-EG / both.

For each rank count the s-EG placement is planned on one part of the trace's sequences and the
traffic is counted on the others (--eval-split), so the numbers are what a placement planned
from yesterday's trace would do on today's requests. --eval-split 0 plans and counts on the same
tokens (in-sample, optimistic). s-TS uses --predictor: `prev-layer` (model-free: the token goes
where its previous layer's experts were) or `oracle` (the layer's true experts; an upper bound).
"""
from __future__ import annotations

import argparse
import json
import sys

from moe_rt.errors import MoeRtError
from moe_rt_app.cli.plan_placement import add_grouping_arguments, grouping_options, hidden_size
from parallel.grouping import plan_expert_groups
from parallel.placement import default_placement
from parallel.traffic import SCHEMES, TrafficOptions, TrafficReport, compare_schemes, ratio
from router_predict.trace import load_trace, split_by_seq


def _rank_list(text: str) -> list[int]:
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"expected rank counts >= 1, got {text!r}")
    return ranks


def default_rank_counts(num_experts: int) -> list[int]:
    """Powers of two from 2 to 64 that divide the experts (every rank holds E/N of them)."""
    return [n for n in (2, 4, 8, 16, 32, 64) if num_experts % n == 0] or [1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, metavar="T.npz", help="routing trace (.npz)")
    parser.add_argument("--ranks", type=_rank_list, default=None, metavar="N,N,...",
                        help="rank counts to simulate; each must divide the number of experts "
                             "(default: the powers of two from 2 to 64 that divide it)")
    parser.add_argument("--eval-split", type=float, default=0.5, metavar="F",
                        help="share of sequences held out for counting; the planner sees the "
                             "rest. 0 = in-sample (default 0.5)")
    parser.add_argument("--predictor", choices=("prev-layer", "oracle"), default="prev-layer",
                        help="experts s-TS assumes for each layer (default prev-layer)")
    parser.add_argument("--token-cap-slack", type=float, default=0.25, metavar="S",
                        help="s-TS: at most ceil((1+S) x T/N) tokens of a batch per rank "
                             "(default 0.25)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", default=None, metavar="F.png",
                        help="write a PNG of all-to-all traffic per token against ranks")
    add_grouping_arguments(parser)


def plot_reports(path: str, results: dict[int, dict[str, TrafficReport]], unit: str) -> None:
    """Two panels against rank count: all-to-all per token, and local share, one line per scheme."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(9, 3.6))
    ax_a, ax_l = fig.subplots(1, 2)
    ranks = sorted(results)
    for scheme in SCHEMES:
        ax_a.plot(ranks, [results[n][scheme].a2a_bytes_per_token for n in ranks], marker="o",
                  label=scheme)
        ax_l.plot(ranks, [results[n][scheme].local_share for n in ranks], marker="o", label=scheme)
    for ax, ylabel in ((ax_a, f"all-to-all {unit} / token"), (ax_l, "local token-expert pairs")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.set_xlabel("expert-parallel ranks")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_l.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise MoeRtError(f"plot {path}: cannot write ({e.strerror})") from None


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    if not 0.0 <= args.eval_split < 1.0:
        raise MoeRtError(f"--eval-split must be in [0, 1), got {args.eval_split}")
    plan_on, count_on = (trace, trace) if args.eval_split == 0 else split_by_seq(trace, args.eval_split)
    E = trace.num_experts
    ranks = args.ranks or default_rank_counts(E)
    bad = [n for n in ranks if E % n]
    if bad:  # every rank holds E/N experts of each layer
        raise MoeRtError(f"--ranks {bad[0]} does not divide the trace's {E} experts; each rank count must "
                         f"divide {E} (e.g. {','.join(map(str, default_rank_counts(E)))})")
    hidden = hidden_size(args, trace)
    opts = TrafficOptions(hidden=hidden or 1, dtype_bytes=args.dtype_bytes if hidden else 1,
                          token_cap_slack=args.token_cap_slack)
    unit = "bytes" if hidden else "rows"
    predicted = count_on.topk_ids if args.predictor == "oracle" else None
    results: dict[int, dict[str, TrafficReport]] = {}
    for n in ranks:
        grouped = plan_expert_groups(plan_on.topk_ids, E, grouping_options(args, n))
        default = default_placement(trace.num_layers, E, n)
        results[n] = compare_schemes(count_on.topk_ids, default, grouped, opts,
                                     predicted_ids=predicted, batch_ids=count_on.steps)
    if args.plot:
        plot_reports(args.plot, results, unit)
    if args.json:
        print(json.dumps({
            "trace": args.trace, "unit": unit, "hidden": hidden, "predictor": args.predictor,
            "eval_split": args.eval_split, "planned_on_tokens": plan_on.num_rows,
            "counted_on_tokens": count_on.num_rows,
            "results": [{"ranks": n, "schemes": {s: r.to_dict() for s, r in results[n].items()}}
                        for n in ranks]}))
        return 0
    where = ("in-sample" if args.eval_split == 0 else
             f"planned on {plan_on.num_rows} tokens, counted on {count_on.num_rows} held-out tokens")
    print(f"{trace.meta.model}: {trace.num_layers} MoE layers x {trace.num_experts} experts, "
          f"top-{trace.top_k}; {where}; s-TS predictor {args.predictor}")
    print(f"{'ranks':>5}  {'scheme':<10} {'a2a ' + unit + '/tok':>16} {'vs base':>8} "
          f"{'local':>6} {'all coll/tok':>14}")
    for n in ranks:
        base = results[n]["baseline"].a2a_bytes_per_token
        for scheme, r in results[n].items():
            print(f"{n:>5}  {scheme:<10} {r.a2a_bytes_per_token:>16.1f} "
                  f"{ratio(r.a2a_bytes_per_token, base):>8.3f} {r.local_share:>6.3f} "
                  f"{r.collective_bytes_per_token:>14.1f}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m ...`), the same as `moe-rt simulate-ep`."""
    from moe_rt_app.cli.main import standalone

    return standalone("simulate-ep", argv)


if __name__ == "__main__":
    sys.exit(main())
