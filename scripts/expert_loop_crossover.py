"""When should the torch expert backend on CPU loop over the experts a step uses instead of calling
grouped_mm (which on CPU runs one matmul per slot, used or not)? Times both on random routing for
growing token counts, on the shapes of the shipped benchmark models, and prints ms per call.

    .venv/bin/python scripts/expert_loop_crossover.py [--threads 1,2] [--repeats 200]

The loop's matmuls go through moe_rt.layers.linear, so in float32 both paths agree to rounding
(checked for every row count). The weights here are one layer's, hot in cache; a decode step streams every
layer's from memory, which favours the loop more, so the rule in moe_rt/layers/moe/compute.py
(CPU_LOOP_MAX_PAIRS) was set from whole-model `moe-rt bench decode` runs (docs/benchmarks.md,
"The matmul form"); this table shows the kernel-level side.
"""
from __future__ import annotations

import argparse
import time

import torch

from moe_rt.layers.moe.compute import _grouped, _one_token, _used_slots

SHAPES = {  # name: (D hidden, I expert intermediate, E experts, K top-k)
    "demo": (192, 256, 16, 2),
    "mixtral-56m": (256, 512, 16, 2),
    "mixtral-offload": (512, 1024, 32, 2),
}
TOKENS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


def best_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]  # median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print("threads shape          tokens pairs  grouped_ms  loop_ms  loop/grouped")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, (D, I, E, K) in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            w13, w2 = torch.randn(E, 2 * I, D, generator=g) * 0.05, torch.randn(E, D, I, generator=g) * 0.05
            for T in TOKENS:
                x = torch.randn(T, D, generator=g)
                ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
                w = torch.rand(T, K, generator=g)
                loop = _one_token if T == 1 else _used_slots
                torch.testing.assert_close(loop(x, w13, w2, ids, w), _grouped(x, w13, w2, ids, w))
                with torch.inference_mode():
                    tg = best_ms(lambda: _grouped(x, w13, w2, ids, w), args.repeats)
                    tl = best_ms(lambda: loop(x, w13, w2, ids, w), args.repeats)
                print(f"{threads:7d} {name:<15} {T:6d} {T * K:5d} {tg:11.3f} {tl:8.3f} {tl / tg:13.2f}", flush=True)


if __name__ == "__main__":
    main()
