"""`moe-rt bench kernel`: the Triton fused MoE step against the torch loop and the bandwidth floor.

For each layer shape and batch size T it reports, all measured in the same run on one GPU:
    fused_ms, loop_ms    median step time of fused_experts and of the per-expert torch loop over
                         --repeats timed calls (the fastest call beside each: *_best)
    speedup              loop_ms / fused_ms
    floor_ms             bytes of the experts actually hit (w13 + w2) / measured copy bandwidth;
                         no implementation can read those weights faster
    floor_frac           floor_ms / fused_ms (1.0 would be at the bandwidth floor)
    graph_ms             fused_experts captured in a CUDA graph and replayed, as a serving engine
                         runs decode steps: the host's launch overhead drops out
    graph_floor_frac     floor_ms / graph_ms
Shapes (E experts, D hidden, I intermediate, K top-k): Mixtral-8x7B (8, 4096, 14336, 2) and
Qwen1.5-MoE-A2.7B (60, 2048, 1408, 4). Without CUDA there is nothing to time: it says so and exits
2, unless --interpret-smoke, which runs tiny shapes in Triton's CPU interpreter to prove the path
works and makes no speed claims.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from .common import add_repeats, repeat_stats


@dataclass(frozen=True)
class LayerShape:
    name: str
    experts: int  # E
    hidden: int  # D
    inter: int  # I
    top_k: int  # K


SHAPES = {
    "mixtral": LayerShape("mixtral-8x7b", 8, 4096, 14336, 2),
    "qwen": LayerShape("qwen1.5-moe-a2.7b", 60, 2048, 1408, 4),
}
SMOKE_SHAPE = LayerShape("smoke", 4, 32, 48, 2)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="mixtral,qwen", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--batch-sizes", default="1,16,64,256", help="comma-separated token counts T")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    add_repeats(parser, 20)
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--json-out", default=None, metavar="PATH",
                        help="also write the JSON object to PATH (the table is still printed)")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="without a GPU: run tiny shapes in the Triton CPU interpreter (no timings)")


def _parse_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def run(args: argparse.Namespace) -> int:
    if args.interpret_smoke:
        return _interpret_smoke(args)
    if not torch.cuda.is_available():
        print("bench kernel: no CUDA GPU found; nothing to time (use --interpret-smoke to check the "
              "kernel path on CPU)", file=sys.stderr)
        return 2
    from moe_rt.errors import MoeRtError

    try:
        shapes = [SHAPES[s] for s in _parse_list(args.shapes, "--shapes")]
        batch_sizes = [int(b) for b in _parse_list(args.batch_sizes, "--batch-sizes")]
    except (KeyError, ValueError) as exc:
        raise MoeRtError(f"bench kernel: bad --shapes/--batch-sizes ({exc}); shapes are {sorted(SHAPES)}") from None
    rows, bandwidth = _bench_cuda(shapes, batch_sizes, DTYPES[args.dtype], args)
    report = json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                         "torch": torch.__version__, "bandwidth_gbs": bandwidth, "rows": rows}, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(report + "\n")
    if args.json:
        print(report)
    else:
        _print_table(rows, bandwidth, args.dtype)
    return 0


def _bench_cuda(shapes, batch_sizes, dtype, args, *, device: str = "cuda", timer=None,
                graph_timer=None, bandwidth: float | None = None) -> tuple[list[dict], float]:
    """Rows of measurements; device/timer/bandwidth are parameters only so tests can drive the
    bookkeeping on CPU with a stub timer (no figures from such a run are ever reported)."""
    from moe_rt.kernels.fused_moe import fused_experts
    from moe_rt.kernels.loop import loop_experts
    from moe_rt.kernels.timing import (cuda_graph_time_ms, cuda_time_ms, measure_bandwidth_gbs,
                                       random_expert_weights, random_routing)
    from moe_rt.kernels.tuning import TuningTables, device_name, dtype_name

    timer = timer or cuda_time_ms
    graph_timer = None if args.no_graph else (graph_timer or cuda_graph_time_ms)
    bandwidth = bandwidth or measure_bandwidth_gbs()
    tables = TuningTables()
    dev = device_name(torch.device(device))
    rows = []
    for shape in shapes:
        w13, w2 = random_expert_weights(shape.experts, shape.hidden, shape.inter, dtype, device)
        tuned = device == "cuda" and tables.table(shape.experts, shape.inter, dev, dtype_name(dtype)) is not None
        gen = torch.Generator().manual_seed(0)
        for t in batch_sizes:
            hidden = torch.randn(t, shape.hidden, generator=gen).to(dtype=dtype, device=device)
            ids, weights = random_routing(t, shape.experts, shape.top_k, device, gen)
            step = (hidden, w13, w2, ids, weights)
            times = dict(warmup=args.warmup, iters=args.repeats, reduce=repeat_stats)
            fused = timer(lambda: fused_experts(*step, tables=tables), **times)
            loop = timer(lambda: loop_experts(*step), **times)
            # The loop syncs with the host (it must learn which experts were hit), so it cannot be
            # captured; only the fused step gets the graph column.
            graph = graph_timer(lambda: fused_experts(*step, tables=tables), **times) if graph_timer else None
            fused_ms, loop_ms, graph_ms = fused.median, loop.median, graph.median if graph else None
            hit = int(torch.unique(ids).numel())
            # Only the experts some token chose must be read; each is its w13 and w2 slices.
            weight_bytes = hit * (w13[0].numel() + w2[0].numel()) * w13.element_size()
            floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
            rows.append({**asdict(shape), "batch": t, "experts_hit": hit, "weight_bytes": weight_bytes,
                         "tuned_config": tuned, "fused_ms": fused_ms, "loop_ms": loop_ms,
                         "fused_ms_best": fused.best, "loop_ms_best": loop.best,
                         "graph_ms_best": graph.best if graph else None,
                         "speedup": loop_ms / fused_ms, "floor_ms": floor_ms,
                         "floor_frac": floor_ms / fused_ms, "graph_ms": graph_ms,
                         "graph_floor_frac": floor_ms / graph_ms if graph_ms else None})
        del w13, w2
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, bandwidth


def _print_table(rows: list[dict], bandwidth: float, dtype: str) -> None:
    print(f"device {torch.cuda.get_device_name()}, {dtype}, copy bandwidth {bandwidth:.0f} GB/s "
          "(measured this run)")
    print(f"{'shape':<20}{'T':>5}{'hit':>5}{'fused ms':>10}{'loop ms':>10}{'speedup':>9}"
          f"{'floor ms':>10}{'of floor':>10}{'graph ms':>10}{'of floor':>10}  config")
    for r in rows:
        graph = (f"{r['graph_ms']:>10.3f}{r['graph_floor_frac']:>10.2f}" if r["graph_ms"]
                 else f"{'-':>10}{'-':>10}")
        print(f"{r['name']:<20}{r['batch']:>5}{r['experts_hit']:>5}{r['fused_ms']:>10.3f}"
              f"{r['loop_ms']:>10.3f}{r['speedup']:>8.2f}x{r['floor_ms']:>10.3f}"
              f"{r['floor_frac']:>10.2f}{graph}  {'tuned' if r['tuned_config'] else 'default'}")


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _interpret_smoke(args: argparse.Namespace) -> int:
    """Run fused_experts on tiny CPU tensors in the interpreter and check it against the reference."""
    # Triton decides interpreter vs compiler when a kernel is decorated, i.e. at import time.
    os.environ["TRITON_INTERPRET"] = "1"
    loaded = sys.modules.get("moe_rt.kernels.fused_moe")
    if loaded is not None and not _is_interpreted(loaded._gate_up_kernel):
        print("bench kernel: fused_moe was imported before TRITON_INTERPRET=1 was set; "
              "run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from moe_rt.kernels.fused_moe import fused_experts
    from moe_rt.kernels.timing import random_expert_weights, random_routing
    from moe_rt.layers.moe.reference import reference_experts

    dtype = DTYPES[args.dtype]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    shape = SMOKE_SHAPE
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    w13, w2 = random_expert_weights(shape.experts, shape.hidden, shape.inter, dtype, "cpu")
    rows = []
    for t in (1, 5):
        hidden = torch.randn(t, shape.hidden, generator=gen).to(dtype)
        ids, weights = random_routing(t, shape.experts, shape.top_k, "cpu", gen)
        out = fused_experts(hidden, w13, w2, ids, weights)
        ref = reference_experts(hidden, w13, w2, ids, weights)
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append({**asdict(shape), "batch": t, "rel_err": rel, "ok": rel <= tol})
    ok = all(r["ok"] for r in rows)
    if args.json:
        print(json.dumps({"interpret_smoke": True, "dtype": args.dtype, "ok": ok, "rows": rows}, indent=2))
    else:
        for r in rows:
            print(f"interpret-smoke {r['name']} T={r['batch']} {args.dtype}: rel err {r['rel_err']:.1e} "
                  f"({'ok' if r['ok'] else 'FAIL'}, tol {tol:.0e}); no timings in interpreter mode")
    return 0 if ok else 1


if __name__ == "__main__":  # `python -m moe_rt_app.bench.kernel`, same as `moe-rt bench kernel`
    _parser = argparse.ArgumentParser(prog="python -m moe_rt_app.bench.kernel", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
