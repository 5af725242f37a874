"""Slow, obviously correct MoE reference: ground truth for every fast path.

Shape legend (used by every MoE module):
    T  tokens in the batch (flattened over sequences)
    D  hidden size
    I  expert intermediate size
    E  routed experts in a layer (logical ids 0..E-1)
    S  expert slots in a weight stack (== E when all experts are resident)
    K  experts chosen per token (top-k)

Expert weights are stacked the way Hugging Face transformers v5 stores them in memory:
    w13 [S, 2I, D]  rows 0..I-1 are the gate projection (w1), rows I..2I-1 the up projection (w3)
    w2  [S, D, I]   the down projection
An expert computes  down(silu(gate(x)) * up(x)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_rt.quant.experts import QuantizedStack
from moe_rt.quant.mixed import MixedStack, as_dense_any


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on x [n, D] with w13 [2I, D], w2 [D, I] -> [n, D]."""
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def reference_experts(
    hidden: torch.Tensor,  # [T, D]
    w13: torch.Tensor | QuantizedStack | MixedStack,  # [S, 2I, D]
    w2: torch.Tensor | QuantizedStack | MixedStack,  # [S, D, I]
    topk_ids: torch.Tensor,  # [T, K] slot index per choice; -1 means "not computed here"
    topk_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]), one token at a time.

    Accumulates in float32 and returns hidden's dtype. Choices with id -1 contribute nothing
    (expert parallelism marks experts that live on another rank that way). Quantized stacks
    (uniform or mixed-width) are dequantised to their compute dtype first.
    """
    w13, w2 = as_dense_any(w13), as_dense_any(w2)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for t in range(hidden.shape[0]):
        for k in range(topk_ids.shape[1]):
            s = int(topk_ids[t, k])
            if s < 0:
                continue
            y = expert_mlp(hidden[t : t + 1].float(), w13[s].float(), w2[s].float())
            out[t] += topk_weights[t, k].float() * y[0]
    return out.to(hidden.dtype)
