"""Shared benchmark plumbing: the flags every `moe-rt bench` spells the same way, the one rule for
repeated timed runs, memory bandwidth, result printing."""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_rt_app.cli.args import positive_int
from moe_rt.errors import MoeRtError


def add_model_choice(p) -> None:
    """--model / --synthetic NAME / --cache-dir, and --json: the model flags of every bench."""
    from .synthetic import SHAPES

    p.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    p.add_argument("--synthetic", metavar="NAME",
                   help=f"build (once) and use a random Mixtral-shaped model: {', '.join(SHAPES)}")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/moe-rt/synthetic"),
                   help="where synthetic models are written (once)")
    p.add_argument("--json", action="store_true", help="print results as JSON")


def add_torch_threads(p, default: int | None = None, where: str = "") -> None:
    shown = default if default else "torch's own"
    p.add_argument("--torch-threads", type=positive_int, default=default,
                   help=f"torch CPU intra-op threads{where} (default: {shown})")


def add_repeats(p, default: int) -> None:
    p.add_argument("--repeats", type=positive_int, default=default,
                   help=f"timed runs per setting; the median and the fastest are reported (default {default})")


@dataclass(frozen=True)
class Repeats:
    """The one rule for repeated timed runs in every bench: the median of N runs is the figure;
    the fastest run (`*_best` in the output) is beside it, as the least-disturbed run on a
    shared machine."""
    median: float
    best: float


def repeat_stats(times: list[float]) -> Repeats:
    """Median and fastest of N timed runs (times in any unit; N >= 1, --repeats is checked)."""
    return Repeats(statistics.median(times), min(times))


def resolve_model(args) -> str:
    if args.model and args.synthetic:
        raise MoeRtError("give either --model or --synthetic, not both")
    if args.synthetic:
        from .synthetic import build_synthetic

        return str(build_synthetic(args.synthetic, args.cache_dir))
    if args.model:
        return args.model
    from moe_rt.checkpoint import default_model_dir

    return default_model_dir()


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise MoeRtError(f"{what} must be comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise MoeRtError(f"{what} must be positive integers, got '{text}'")
    return values


def measure_bandwidth(device: torch.device, mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large copy (read + write), the best of a few runs: the memory floor's yardstick."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch pages
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def emit(rows: list[dict], args, header: list[str], extra: dict | None = None) -> None:
    if args.json:
        print(json.dumps({"results": rows, **(extra or {})}, indent=2))
        return
    if extra:
        for k, v in extra.items():
            print(f"{k}: {v}")
    widths = [max(len(h), *(len(_fmt(r.get(h))) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(h)).rjust(w) for h, w in zip(header, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


def write_json(path: str | Path | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2))
