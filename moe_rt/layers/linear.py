"""y = x @ w.T (+ bias), the one projection every layer, the router, the LM head and the CPU expert
compute call, computed in the form that is fastest for the shape.

Why this exists: on the CPU, for a float32 weight [N, K] stored row-major (how checkpoints and
nn.Linear keep it) and a few input rows, PyTorch's `F.linear` (BLAS `x · wᵀ`) streams the weight
at a fraction of memory bandwidth: 7-8 GB/s for a [1024, 256] expert projection where `(w · xᵀ)ᵀ`
reaches 20+ GB/s, i.e. 2-4× slower at 1-8 rows and ~1.3× at 16 (scripts/linear_crossover.py;
docs/benchmarks.md, "Decode overhead"). A single row still takes BLAS's slow matrix-vector path,
so it is padded to two rows. Small weights (routers) take plain `x · wᵀ`, which costs fewer
ops there (SMALL_WEIGHT below). Half-precision weights take `F.linear`, which was as fast or faster
for them. Both forms do the same dot products in float32; only the order of the additions inside
BLAS may differ, so results agree to float32 rounding, not bit for bit (every path of one process
uses this function, so paths that must agree with each other still do).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Float32 inputs with at most this many rows take (w · xᵀ)ᵀ on the CPU; more take F.linear, whose
# blocked GEMM wins once the weight is reused by enough rows. Measured by scripts/linear_crossover.py.
ROW_MAJOR_MAX_ROWS = 16
# Except for small weights (N·K elements at most SMALL_WEIGHT), and one row through at most
# FEW_OUTPUTS outputs (a router): there x·wᵀ is one dot product per output over contiguous weight
# rows, and the (w·xᵀ)ᵀ form's fixed cost (padding, the copy back into rows) is most of the time:
# a 16 x 256 router 13.6 -> 2.9 us per call, 60 x 2048 (Qwen1.5-MoE) 44 -> 32 us at one row.
SMALL_WEIGHT = 32768
FEW_OUTPUTS = 64


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           contiguous: bool = True) -> torch.Tensor:
    """x [..., K] @ w[N, K].T (+ bias [N]) -> [..., N], contiguous; with contiguous=False one row
    may come back as a view of the transposed product (its elements 2 apart), for callers that
    only view and read it: that spares the two ops of writing it out."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() < 2:
        return F.linear(x, w, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows > ROW_MAJOR_MAX_ROWS:
        return F.linear(x, w, bias)
    K, N = x.shape[-1], w.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(rows, K)
    if (N * K <= SMALL_WEIGHT or (rows == 1 and N <= FEW_OUTPUTS)) and w.stride() == (K, 1):
        # a router-sized weight: x·wᵀ straight into rows (4 dispatched ops, no padding or copy)
        y = torch.mm(x2.contiguous(), w.as_strided((K, N), (1, K), w.storage_offset()))
        y = y if bias is None else y + bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)
    if rows == 1:  # one row goes to BLAS's matrix-vector kernel, the slow one: give it two
        x2 = torch.cat((x2, x2))
    r = x2.shape[0]
    # The transposes as one as_strided view each (not .t() and a slice: fewer dispatched ops on a
    # path every projection takes). x2 is contiguous, so its transpose is (K, r) with strides
    # (1, K); w·x2ᵀ is [N, r] contiguous, whose first `rows` columns read as rows are (rows, N)
    # with strides (1, r).
    x2 = x2.contiguous()  # a no-op (no dispatch) for the usual contiguous rows
    y_t = torch.mm(w, x2.as_strided((K, r), (1, K))).as_strided((rows, N), (1, r))
    # Callers view the result, so it is written out row-major (empty + copy_: two dispatched ops
    # where clone takes four).
    if contiguous or rows > 1:
        y = torch.empty((rows, N), dtype=y_t.dtype, device=y_t.device).copy_(y_t)
    else:
        y = y_t
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same loading) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
