"""Expert-compute backends: (hidden, w13, w2, slot ids, weights) -> weighted sum over the K choices.

Every backend has the signature of `reference.reference_experts` and must match it:
    hidden [T, D], w13 [S, 2I, D], w2 [S, D, I], topk_ids [T, K] slots (-1 = skip), topk_weights [T, K]
    -> [T, D] in hidden's dtype.
`get_expert_compute(name)` is the one place a backend is chosen.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moe_rt.errors import MoeRtError

ExpertCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_experts(hidden, w13, w2, topk_ids, topk_weights) -> torch.Tensor:
    """Sort (token, choice) pairs by slot and run every expert's rows in one grouped GEMM per
    projection (torch.nn.functional.grouped_mm), the way fused MoE kernels do on GPUs. Falls
    back to one matmul pair per used expert where grouped_mm is missing."""
    esize = hidden.element_size()
    T, K = topk_ids.shape
    # grouped_mm wants 16-byte-aligned row strides; odd toy shapes take the per-expert loop.
    # (It visits every slot, used or not, yet measured no slower than the loop over used slots
    # even at batch 1 with 16 experts, and 2.4x faster at batch 4: one kernel beats Python.)
    if not _HAS_GROUPED_MM or (w2.shape[1] * esize) % 16 or (w2.shape[2] * esize) % 16:
        return loop_experts(hidden, w13, w2, topk_ids, topk_weights)
    if T == 0:  # an expert-parallel rank can receive no tokens in a step
        return torch.zeros_like(hidden)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_slots = flat[order]
    if sorted_slots[0] < 0:  # -1 (computed elsewhere) pairs sort first: drop them
        keep = int((sorted_slots >= 0).sum())
        order, sorted_slots = order[order.numel() - keep :], sorted_slots[sorted_slots.numel() - keep :]
    # offs[s] = end row of slot s in the sorted rows; slots without rows give empty groups.
    offs = torch.bincount(sorted_slots, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    tokens = order // K
    gate, up = F.grouped_mm(hidden[tokens], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    out = torch.zeros_like(hidden)
    out.index_add_(0, tokens, (y * topk_weights.reshape(-1)[order, None]).to(out.dtype))
    return out


_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# The per-expert loop (one matmul pair per used expert) lives with the kernels it is the baseline of.
from moe_rt.kernels.loop import loop_experts  # noqa: E402


def _triton_experts() -> ExpertCompute:
    try:
        from moe_rt.kernels.fused_moe import fused_experts
        from moe_rt.kernels.tuning import TuningTables
    except ImportError as e:  # triton missing or the kernel package not importable
        raise MoeRtError(f"expert compute 'triton' is unavailable: {e}") from None
    # One table cache per backend instance: a missing tuning table is warned about once.
    tables = TuningTables()

    def triton_experts(hidden, w13, w2, topk_ids, topk_weights):
        return fused_experts(hidden, w13, w2, topk_ids, topk_weights, tables=tables)

    return triton_experts


def get_expert_compute(name: str) -> ExpertCompute:
    if name == "torch":
        return torch_experts
    if name == "triton":
        return _triton_experts()
    if name == "loop":
        return loop_experts
    if name == "reference":
        from .reference import reference_experts

        return reference_experts
    raise MoeRtError(f"unknown expert compute backend '{name}' (choose torch, loop, triton or reference)")
