"""`moe-rt simulate-cache`: replay a routing trace through the expert cache offline.

Prints, per policy, the hit rate next to Belady's (the demand-paging bound) and their ratio; with
--schedule, first regroups the trace's rows into the steps a scheduling policy takes; with
--plot, also sweeps capacity from 1 to E slots per layer and writes a PNG of hit rate per policy.
Bad input raises MoeRtError; `main` (and moe_rt_app.cli.main) print it and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from expert_cache.plots import check_plot_path
from moe_rt_app.cli.args import int_in, non_negative_float, output_file, positive_int
from moe_rt.errors import MoeRtError

ORACLE = "oracle"  # built-in perfect predictor: forecasts from the replayed trace itself
USER_POLICIES = ("lru", "lfu", "predictive")
MAX_SWEEP_POINTS = 16  # beyond this many capacities the sweep samples them, 1 and E included


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="routing trace .npz to replay (docs/traces.md)")
    parser.add_argument("--capacity", required=True, type=int,
                        help="fast-tier slots per MoE layer (scope global: a shared pool of "
                             "capacity x L slots)")
    parser.add_argument("--scope", choices=("per_layer", "global"), default="per_layer",
                        help="per_layer: slots per layer; global: one pool shared by all layers")
    parser.add_argument("--policy", default=None,
                        help="comma-separated policies from lru,lfu,predictive (default lru,lfu, "
                             "plus predictive when --predictor is given); Belady is always shown")
    parser.add_argument("--predictor", default=None,
                        help="predictor driving policy predictive: a router_predict name "
                             "(frequency, coactivation, ...) or 'oracle' (perfect forecasts, "
                             "an upper reference)")
    parser.add_argument("--fit-on", default=None, metavar="T2.npz",
                        help="trace to fit the predictor on; use other sequences than --trace")
    parser.add_argument("--predictor-dir", default=None, help="folder of a trained predictor")
    parser.add_argument("--model", default=None, help="model folder (predictor gate_lookahead)")
    parser.add_argument("--depth", type=positive_int, default=1,
                        help="look-ahead: MoE layers predicted and prefetched ahead (default 1)")
    parser.add_argument("--prefetch-queue", type=int_in(0), default=8,
                        help="most prefetches issued after one layer (default 8)")
    parser.add_argument("--read-ms", type=float, default=None,
                        help="milliseconds to read one expert from the slow tier; with --layer-ms, "
                             "prefetch by the runtime's cost rule and report modelled stall time")
    parser.add_argument("--layer-ms", type=float, default=None,
                        help="milliseconds of compute per MoE layer (with --read-ms)")
    parser.add_argument("--prefetch-rule", choices=("cost", "always"), default="cost",
                        help="cost (default, as the runtime): prefetch a forecast expert only where "
                             "its calibrated probability pays for the read and the expert it evicts "
                             "(with --read-ms/--layer-ms also for when it lands); always: every "
                             "forecast expert that may displace its victim")
    parser.add_argument("--prefetch-loads-budget", type=non_negative_float, default=1.1, metavar="X",
                        help="policy predictive: most loads as a multiple of LRU's on the same "
                             "accesses; a prefetch beyond it is refused, as the runtime's "
                             "prefetch_loads_budget (default 1.1; 0: no budget)")
    parser.add_argument("--schedule", choices=("fcfs", "expert_aware"), default=None,
                        help="first regroup the trace's rows into the steps this scheduling policy takes "
                             "(docs/scheduling.md); default: replay the trace's own steps")
    parser.add_argument("--concurrency", type=positive_int, default=16,
                        help="--schedule: sequences running at once (default 16)")
    parser.add_argument("--step-size", type=positive_int, default=None,
                        help="--schedule: most sequences decoding per step (default: all running under fcfs, "
                             "half of them under expert_aware)")
    parser.add_argument("--max-skips", type=positive_int, default=3,
                        help="--schedule expert_aware: steps a sequence may wait in a row (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", type=output_file, default=None, metavar="FILE.png",
                        help="also sweep capacity 1..E per layer and write hit rate vs capacity")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _policies(args: argparse.Namespace) -> list[str]:
    if args.policy is None:
        return ["lru", "lfu"] + (["predictive"] if args.predictor else [])
    names = [p.strip() for p in args.policy.split(",") if p.strip()]
    bad = [p for p in names if p not in USER_POLICIES + ("belady",)]
    if bad or not names:
        raise MoeRtError(f"--policy: unknown policy {bad[0] if bad else args.policy!r}; "
                         f"choose from {', '.join(USER_POLICIES)}")
    names = [p for p in dict.fromkeys(names) if p != "belady"]
    if "predictive" in names and not args.predictor:
        raise MoeRtError("--policy predictive needs --predictor NAME")
    if args.predictor and "predictive" not in names:
        raise MoeRtError("--predictor is only used by policy predictive; add it to --policy")
    return names


def sweep_capacities(num_experts: int, also: int) -> list[int]:
    """1..E when E is small, else MAX_SWEEP_POINTS evenly spaced values with 1 and E; plus `also`."""
    if num_experts <= MAX_SWEEP_POINTS:
        caps = set(range(1, num_experts + 1))
    else:
        step = (num_experts - 1) / (MAX_SWEEP_POINTS - 1)
        caps = {round(1 + i * step) for i in range(MAX_SWEEP_POINTS)}
    return sorted(caps | {also})


def _schedule(args, trace, progress: bool):
    from expert_cache.simulator import oracle_schedule, predict_schedule

    if args.predictor == ORACLE:
        return oracle_schedule(trace, args.depth)
    from router_predict.registry import build_predictor, check_trace_fits
    from router_predict.trace import load_trace

    fit = load_trace(args.fit_on) if args.fit_on else None
    predictor = build_predictor(args.predictor, fit_trace=fit, model_dir=args.model,
                                predictor_dir=args.predictor_dir, depth=args.depth)
    check_trace_fits(predictor, trace)
    return predict_schedule(trace, predictor, args.depth, progress=progress)


def run(args: argparse.Namespace) -> int:
    from expert_cache.simulator import BatchNeeds, SimOptions, hit_rate_curve, pool_slots, simulate
    from router_predict.trace import load_trace

    policies = _policies(args)
    if args.plot:
        check_plot_path(args.plot)  # fail before a long sweep, not after
    trace = load_trace(args.trace)
    E, L = trace.num_experts, trace.num_layers
    if not 1 <= args.capacity <= E:
        raise MoeRtError(f"--capacity must be between 1 and {E} (experts per layer), "
                         f"got {args.capacity}")
    progress = not args.no_progress and not args.json
    scheduled = None
    if args.schedule:
        from expert_cache.schedule_replay import schedule_trace

        scheduled = schedule_trace(trace, args.schedule, args.concurrency, args.step_size, args.max_skips)
        trace = scheduled.trace
    elif args.step_size is not None:
        raise MoeRtError("--step-size is for --schedule")
    needs = BatchNeeds.from_trace(trace)
    schedule = _schedule(args, trace, progress) if "predictive" in policies else None

    slots = pool_slots(args.capacity, args.scope, L)
    costs = _costs(args)
    results = {p: simulate(needs, SimOptions(p, slots, args.scope, args.prefetch_queue, costs=costs,
                                                    prefetch_rule=args.prefetch_rule,
                                                    prefetch_loads_budget=args.prefetch_loads_budget or None),
                           schedule if p == "predictive" else None)
               for p in [*policies, "belady"]}
    bound = results["belady"].hit_rate
    report = {
        "trace": args.trace, "steps": needs.num_steps, "layers": L, "experts": E,
        "top_k": trace.top_k, "scope": args.scope, "capacity_per_layer": args.capacity,
        "pool_slots": slots, "predictor": args.predictor,
        "depth": args.depth if schedule else None, "belady": results["belady"].as_dict(),
        "policies": {p: {**results[p].as_dict(),
                         "ratio_to_belady": results[p].hit_rate / bound if bound else None}
                     for p in policies},
    }
    if scheduled is not None:
        report["schedule"] = {
            "policy": args.schedule, "concurrency": args.concurrency, "step_size": args.step_size,
            "max_skips": args.max_skips, "decode_steps": scheduled.decode_steps,
            "decode_tokens": scheduled.decode_tokens,
            "distinct_experts_per_layer_step": scheduled.decode_union,
            "max_consecutive_skips": scheduled.max_consecutive_skips}
        for r in [report["belady"], *report["policies"].values()]:
            r["loads_per_decode_token"] = r["loads"] / scheduled.decode_tokens if scheduled.decode_tokens else None
    if args.plot:
        from expert_cache.plots import plot_hit_rate_curve

        caps = sweep_capacities(E, args.capacity)
        curve = hit_rate_curve(needs, caps, policies, scope=args.scope, schedule=schedule,
                               prefetch_queue=args.prefetch_queue, progress=progress)
        plot_hit_rate_curve(curve, args.plot, f"{trace.meta.model}: {args.scope}, "
                                              f"{L} layers x {E} experts, top-{trace.top_k}")
        report["curve"] = {"capacities": list(caps),
                           "hit_rate": {p: curve.hit_rates(p) for p in curve.results}}
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _costs(args: argparse.Namespace):
    """PrefetchCosts from --read-ms / --layer-ms (both or neither), else None."""
    from expert_cache.cost_model import PrefetchCosts

    if (args.read_ms is None) != (args.layer_ms is None):
        raise MoeRtError("give --read-ms and --layer-ms together")
    if args.read_ms is None:
        return None
    if args.read_ms <= 0 or args.layer_ms <= 0:
        raise MoeRtError("--read-ms and --layer-ms must be positive")
    return PrefetchCosts(args.read_ms / 1e3, args.layer_ms / 1e3)


def _print_table(report: dict) -> None:
    print(f"{report['trace']}: {report['steps']} steps, {report['layers']} MoE layers x "
          f"{report['experts']} experts, top-{report['top_k']}; capacity "
          f"{report['capacity_per_layer']} slots/layer ({report['scope']}, pool {report['pool_slots']})")
    if "schedule" in report:
        sc = report["schedule"]
        print(f"schedule {sc['policy']}: {sc['concurrency']} running, step size "
              f"{sc['step_size'] or 'default'}: {sc['decode_steps']} decode steps for {sc['decode_tokens']} "
              f"tokens, {sc['distinct_experts_per_layer_step']:.2f} distinct experts per layer-step, "
              f"longest wait {sc['max_consecutive_skips']} steps; loads per decode token: "
              + ", ".join(f"{n} {r['loads_per_decode_token']:.2f}"
                          for n, r in [*report["policies"].items(), ("belady", report["belady"])]))
    b = report["belady"]
    print(f"{'policy':<11} {'hit rate':>8} {'belady':>8} {'ratio':>6} {'loads':>8} "
          f"{'belady loads':>12} {'prefetch hits':>13} {'wasted pf':>9}")
    for name, r in report["policies"].items():
        ratio = "-" if r["ratio_to_belady"] is None else f"{r['ratio_to_belady']:.3f}"
        timed = "" if "modelled_s" not in r else (f"  modelled: {r['modelled_s']:.3f} s, stall "
                                                   f"{r['stall_s']:.3f} s, {r['modelled_reads']} reads")
        print(f"{name:<11} {r['hit_rate']:>8.4f} {b['hit_rate']:>8.4f} {ratio:>6} {r['loads']:>8} "
              f"{b['loads']:>12} {r['prefetch_hits']:>13} {r['wasted_prefetches']:>9}{timed}")
    print("belady = optimal demand paging (no prefetch): no policy needs fewer loads; "
          "prefetching can exceed its hit rate.")
    if "plot" in report:
        print(f"wrote {report['plot']}")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m ...`), the same as `moe-rt simulate-cache`."""
    from moe_rt_app.cli.main import standalone

    return standalone("simulate-cache", argv)


if __name__ == "__main__":
    sys.exit(main())
