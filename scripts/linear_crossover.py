"""Which form of y = x·wᵀ is fastest on this CPU, for the projection shapes of the shipped and
synthetic models and the row counts of decode? Times `F.linear` against moe_rt.layers.linear
(the (w·xᵀ)ᵀ form it takes for float32 inputs of at most ROW_MAJOR_MAX_ROWS rows) and prints
microseconds per call and the ratio. Each call reads a different weight out of a set larger than
the CPU's caches, as a decode step does (every layer's weights are distinct), so the figures are
those of weights streamed from memory, not of one weight hot in cache.

    .venv/bin/python scripts/linear_crossover.py [--threads 2] [--dtypes float32,bfloat16]

The rule in moe_rt/layers/linear.py (ROW_MAJOR_MAX_ROWS, float32 only) was read off this table.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moe_rt.layers.linear import linear

SHAPES = {  # name: [N, K] weight
    "demo expert gate_up": (512, 192),
    "demo expert down": (192, 256),
    "mixtral-56m expert gate_up": (1024, 256),
    "mixtral-56m expert down": (256, 512),
    "mixtral-offload expert gate_up": (2048, 512),
    "mixtral-56m lm_head": (8192, 256),
}
ROWS = [1, 2, 4, 8, 16, 32]
WORKING_SET = 96 << 20  # bytes of distinct weights cycled through: well past the last-level cache


def per_call_us(fn, weights, repeats: int) -> float:
    """Median over `repeats` sweeps of the mean time per call, each call on the next weight."""
    n = len(weights)
    for w in weights[:8]:
        fn(w)
    sweeps = []
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            fn(w)
        sweeps.append((time.perf_counter() - t) / n)
    sweeps.sort()
    return 1e6 * sweeps[len(sweeps) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; us per call, F.linear / linear (ratio > 1: linear faster)")
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for name, (N, K) in SHAPES.items():
            count = max(4, WORKING_SET // (N * K * torch.finfo(dtype).bits // 8))
            g = torch.Generator().manual_seed(0)
            weights = [torch.randn(N, K, generator=g).to(dtype) for _ in range(count)]
            cells = []
            for rows in ROWS:
                x = torch.randn(rows, K, generator=g).to(dtype)
                torch.testing.assert_close(linear(x, weights[0]), F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
                with torch.inference_mode():
                    a = per_call_us(lambda w: F.linear(x, w), weights, args.repeats)
                    b = per_call_us(lambda w: linear(x, w), weights, args.repeats)
                cells.append(f"{rows:2d}: {a:6.1f}/{b:6.1f}={a / b:4.2f}")
            print(f"{str(dtype)[6:]:8s} {name:31s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
