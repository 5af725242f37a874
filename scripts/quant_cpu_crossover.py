"""Where PyTorch's low-bit CPU kernels stop beating dequantise-then-matmul, per expert projection.

For each expert-matrix shape and row count: fp32 matmul (the unquantised baseline), the low-bit
kernel on bfloat16 activations (moe_rt/layers/moe/compute_quant.py's fast path) and
dequantise + fp32 matmul (its fallback), best of 5 runs of `--iters` calls, microseconds per call.
The rule CPU_LOWBIT_MAX_ROWS in compute_quant.py is read off this table.

    python scripts/quant_cpu_crossover.py --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

from moe_rt.quant.experts import quantize_experts

SHAPES = {"demo w13": (512, 192), "demo w2": (192, 256), "mixtral-56m w13": (1024, 256),
          "mixtral-56m w2": (256, 512)}


def best_us(fn, iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t) / iters)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("shape, rows: fp32 | int8 kernel, int8 dequant | int4 kernel, int4 dequant  (us per call)")
    for name, (N, K) in SHAPES.items():
        w = torch.randn(1, N, K)
        q8, q4 = quantize_experts(w, 8, K), quantize_experts(w, 4, 64)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, K)
            fp = best_us(lambda: torch.mm(x, w[0].t()), args.iters)
            k8 = best_us(lambda: torch._weight_int8pack_mm(x.bfloat16(), q8.cpu.qweight[0], q8.cpu.scales[0]).float(),
                         args.iters)
            d8 = best_us(lambda: torch.mm(x, q8.dequantize(0).t()), args.iters)
            k4 = best_us(lambda: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), q4.cpu.qweight[0], 64,
                                                                    q4.cpu.scales[0]).float(), args.iters)
            d4 = best_us(lambda: torch.mm(x, q4.dequantize(0).t()), args.iters)
            print(f"{name} {N}x{K}, {rows}: {fp:.1f} | {k8:.1f}, {d8:.1f} | {k4:.1f}, {d4:.1f}")


if __name__ == "__main__":
    main()
