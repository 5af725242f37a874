"""`moe-rt eval-predictor`: replay a trace through one or more predictors and print their scores.

Without --fit-on, fit-needing predictors are fitted on a held-out-by-sequence split of the trace
and every predictor is judged on the other part, so no predictor is scored on rows it saw.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moe_rt_app.cli.args import output_file, positive_int
from moe_rt.errors import MoeRtError
from router_predict.evaluate import PredictorReport, plot_recall_per_layer, replay
from router_predict.registry import PREDICTOR_NAMES, build_predictor
from router_predict.trace import load_trace, split_by_seq


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="routing trace .npz to evaluate on (docs/traces.md)")
    parser.add_argument("--predictor", required=True,
                        help=f"comma-separated predictor names: {', '.join(PREDICTOR_NAMES)}")
    parser.add_argument("--depth", type=positive_int, default=1, help="look-ahead distances 1..D to score")
    parser.add_argument("--fit-on", help="trace to fit/train predictors on (default: 80%% of --trace's sequences)")
    parser.add_argument("--model", help="Hugging Face model folder (gate_lookahead, gate_lookahead_output read its "
                                        "routers; default: the folder the trace was recorded from, if it exists)")
    parser.add_argument("--predictor-dir", help="folder of a trained learned/path predictor")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=output_file, help="write a PNG of recall per layer per predictor")


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.predictor.split(",") if n.strip()]
    if not names:
        raise MoeRtError("--predictor needs at least one name")
    trace = load_trace(args.trace)
    if args.fit_on:
        fit, test, note = load_trace(args.fit_on), trace, f"fitted on {args.fit_on}"
    else:
        fit, test = split_by_seq(trace)
        note = "fitted on 80% of sequences, scored on the other 20%"
    model_dir = args.model or recorded_model_dir(test)
    reports = []
    for name in names:
        predictor = build_predictor(name, fit_trace=fit, model_dir=model_dir,
                                    predictor_dir=args.predictor_dir, depth=args.depth)
        reports.append(replay(test, predictor, args.depth, progress=not args.json))
    if args.plot:
        plot_recall_per_layer(reports, args.plot)
    if args.json:
        print(json.dumps({"trace": args.trace, "note": note, "rows": test.num_rows,
                          "predictors": [r.to_dict() for r in reports]}, indent=1))
    else:
        print(format_table(reports, test.top_k))
        print(f"({note}; {test.num_rows} rows; k={test.top_k})")
    return 0


def recorded_model_dir(trace) -> str | None:
    """The model folder a trace names in its meta, when that folder is still there (a trace
    recorded by `moe-rt trace` names the folder it ran)."""
    model = trace.meta.model
    return model if (Path(model) / "config.json").is_file() else None


def format_table(reports: list[PredictorReport], k: int) -> str:
    fmt = (lambda v: "   -  " if v is None or math.isnan(v) else f"{v:6.3f}")
    w = max([16] + [len(r.name) for r in reports])
    lines = [f"{'predictor':<{w}} {'d':>4} {'recall@k':>8} {'prec@2k':>8} {'exact':>8} {'us/token':>9}"]
    for r in reports:
        rows = [(str(d), m) for d, m in r.by_distance.items()]
        if r.path is not None:
            rows.append(("path", r.path))
        for label, m in rows:
            lines.append(f"{r.name:<{w}} {label:>4} {fmt(m['recall']):>8} {fmt(m['precision_2k']):>8} "
                         f"{fmt(m['exact']):>8} {r.cost_us_per_token:9.2f}")
    return "\n".join(lines)
