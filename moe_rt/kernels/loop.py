"""Per-expert torch loop: the baseline the fused kernel is benchmarked against.

Shape legend as in moe_rt/layers/moe/reference.py (T tokens, D hidden, I intermediate, S slots,
K choices). This is what a plain PyTorch MoE layer does: for each slot that received tokens,
gather them, run two matmuls in the weights' dtype, and scatter-add the weighted result. It syncs
with the host once per step (to learn which slots are hit), as such loops do in practice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_rt.quant.experts import as_dense


def loop_experts(
    hidden: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [S, 2I, D]
    w2: torch.Tensor,  # [S, D, I]
    topk_ids: torch.Tensor,  # [T, K] slot per choice, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:  # [T, D] in hidden's dtype
    """Same contract as reference_experts; accumulates the weighted sum in fp32. Quantized stacks
    are dequantised whole (the loop is a baseline, not a quantized fast path)."""
    w13, w2 = as_dense(w13), as_dense(w2)
    T, K = topk_ids.shape
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by slot, -1 first
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=w13.shape[0]).tolist()
    start = int((flat_ids < 0).sum())
    flat_weights = topk_weights.reshape(-1)
    for slot, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // K
        x = hidden.index_select(0, tokens)  # [n, D]
        gate, up = (x @ w13[slot].t()).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[slot].t()  # [n, D]
        out.index_add_(0, tokens, y.float() * flat_weights[pairs].float()[:, None])
    return out.to(hidden.dtype)
