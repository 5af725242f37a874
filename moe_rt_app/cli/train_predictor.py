"""`moe-rt train-predictor`: train a learned pre-gate or path predictor on a trace and save it."""
from __future__ import annotations

import argparse

from moe_rt_app.cli.args import int_in, output_dir, positive_float, positive_int
from router_predict.predictors.training import TrainConfig
from router_predict.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="routing trace .npz to train on (docs/traces.md)")
    parser.add_argument("--out", required=True, type=output_dir, help="folder to write the trained predictor to")
    parser.add_argument("--kind", choices=("learned", "path"), default="learned",
                        help="learned: pre-gate on hidden states (trace needs hidden); "
                             "path: from token ids (trace needs token_ids)")
    parser.add_argument("--depth", type=positive_int, default=1, help="layers ahead the learned pre-gate predicts")
    parser.add_argument("--epochs", type=positive_int, default=20, help="passes over the training rows")
    parser.add_argument("--mlp-hidden", type=int_in(0), default=0, help="learned: MLP width (0 = linear)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="Adam learning rate")


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr)
    if args.kind == "learned":
        from router_predict.predictors.learned import train_pregate
        result = train_pregate(trace, args.depth, args.mlp_hidden, cfg)
    else:
        from router_predict.predictors.path import train_path
        result = train_path(trace, cfg=cfg)
    result.predictor.save(args.out)
    log = result.log
    print(f"held-out loss {log.held_out_loss_before:.4f} -> {log.held_out_loss[-1]:.4f}, "
          f"held-out recall@{trace.top_k} {log.held_out_recall:.3f}; saved to {args.out}")
    return 0
