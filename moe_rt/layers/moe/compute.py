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
from moe_rt.layers.linear import linear
from moe_rt.quant.experts import QuantizedStack
from moe_rt.quant.mixed import MixedStack, mixed_experts

from . import compute_columns as columns
from .compute_quant import quantized_experts

ExpertCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# A CPU step with at most this many (token, choice) pairs runs one matmul pair per expert it uses,
# looping in Python; above it, one grouped_mm per projection. (grouped_mm on CPU is itself a loop
# over every slot, used or not, each matmul in BLAS's x·wᵀ form.) Float32 loops through
# layers.linear, whose (w·xᵀ)ᵀ form streams a weight 1.5-4× faster at the few rows an expert gets
# in decode, so the loop wins up to large batches: mixtral-56m batch 16, 402 -> 802 tok/s; batch 64,
# 1101 -> 1452. Half precision takes F.linear either way, and there grouped_mm's lower overhead wins
# above 8 pairs (mixtral-56m bf16 batch 16: 738 vs 646 tok/s). Measured with `moe-rt bench decode`;
# see docs/benchmarks.md ("Decode overhead").
CPU_LOOP_MAX_PAIRS = {torch.float32: 256}
CPU_LOOP_MAX_PAIRS_DEFAULT = 8


def torch_experts(hidden, w13, w2, topk_ids, topk_weights) -> torch.Tensor:
    """Group (token, choice) pairs by slot and run each group's rows through its expert, in the
    weights' dtype, adding the weighted results in slot order. On a GPU: one grouped GEMM per
    projection (torch.nn.functional.grouped_mm) and no host read of the routing. On a CPU, where
    reading a tensor waits for nothing: a loop over the slots that have rows (small batches), or
    grouped_mm (large ones). Every path does the same products and the same additions in the same
    order; the loop's matmuls go through layers.linear, whose BLAS call may sum a dot product in
    another order, so loop and grouped agree to rounding (exactly for half precision). Shapes
    grouped_mm refuses take the per-expert loop of kernels/loop.py. Quantized stacks
    (moe_rt/quant/experts.py) take compute_quant.quantized_experts; mixed-width ones
    (moe_rt/quant/mixed.py) run each part through this function."""
    if isinstance(w13, MixedStack):
        return mixed_experts(hidden, w13, w2, topk_ids, topk_weights, torch_experts)
    if isinstance(w13, QuantizedStack):
        return quantized_experts(hidden, w13, w2, topk_ids, topk_weights)
    T, K = topk_ids.shape
    if T == 0:  # an expert-parallel rank can receive no tokens in a step
        return torch.zeros_like(hidden)
    cpu = hidden.device.type == "cpu"
    esize = hidden.element_size()
    # grouped_mm wants 16-byte-aligned row strides; odd toy shapes take the per-expert loop.
    if not _HAS_GROUPED_MM or (w2.shape[1] * esize) % 16 or (w2.shape[2] * esize) % 16:
        return loop_experts(hidden, w13, w2, topk_ids, topk_weights)
    small = cpu and T * K <= CPU_LOOP_MAX_PAIRS.get(hidden.dtype, CPU_LOOP_MAX_PAIRS_DEFAULT)
    if small and hidden.dtype == torch.float32 and w13.dtype == torch.float32 and columns.supports(w13, w2):
        one = columns.one_token_columns if T == 1 else columns.used_slots_columns
        return one(hidden, w13, w2, topk_ids, topk_weights)
    if cpu and T == 1:
        return _one_token(hidden, w13, w2, topk_ids, topk_weights)
    if small:
        return _used_slots(hidden, w13, w2, topk_ids, topk_weights)
    return _grouped(hidden, w13, w2, topk_ids, topk_weights)


def _grouped(hidden, w13, w2, topk_ids, topk_weights) -> torch.Tensor:
    """One grouped_mm per projection over every slot. Nothing is read back to the host: pairs
    marked -1 (computed elsewhere) sort after every group, so grouped_mm ignores them, and their
    rows are zeroed before the combine."""
    T, K = topk_ids.shape
    S = w13.shape[0]
    flat = topk_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, S)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    # offs[s] = end row of slot s in the sorted rows; slots without rows give empty groups.
    offs = torch.searchsorted(sorted_key, torch.arange(S, device=flat.device), right=True).to(torch.int32)
    tokens = order // K
    gate, up = F.grouped_mm(hidden[tokens], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = torch.where((sorted_key < S)[:, None], y * topk_weights.reshape(-1)[order, None], 0)
    return _combine(hidden, tokens, y)


def _used_slots(hidden, w13, w2, topk_ids, topk_weights) -> torch.Tensor:
    """_grouped's arithmetic with one matmul pair per slot that has rows, none for the others."""
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # -1 pairs first
    slots = flat[order].tolist()
    first = next((i for i, s in enumerate(slots) if s >= 0), len(slots))
    if first == len(slots):
        return torch.zeros_like(hidden)
    order = order[first:]
    tokens = order // K
    x = hidden[tokens]
    I = w2.shape[2]
    ys, start = [], first
    for end in range(first + 1, len(slots) + 1):
        if end < len(slots) and slots[end] == slots[start]:
            continue
        s = slots[start]
        h = linear(x[start - first : end - first], w13[s])
        ys.append(linear(F.silu(h[:, :I]) * h[:, I:], w2[s]))
        start = end
    y = torch.cat(ys) * topk_weights.reshape(-1)[order, None]
    return _combine(hidden, tokens, y)


def _combine(hidden: torch.Tensor, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum each token's weighted expert rows: every row rounded to hidden's dtype (as one expert's
    output in that dtype would be), added in float32, rounded once. A bf16/fp16 index_add_ would
    round after every addition, and on CUDA its atomics add in no fixed order, so expert-parallel
    and single-process results could differ; in float32 the K rounded rows of a token add exactly."""
    dtype = hidden.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        out = torch.zeros_like(hidden)
        out.index_add_(0, tokens, y.to(dtype))
        return out
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, tokens, y.to(dtype).float())
    return out.to(dtype)


def _one_token(hidden, w13, w2, topk_ids, topk_weights) -> torch.Tensor:
    """T == 1 (batch-1 decode): _grouped's arithmetic on the token's own row, without index
    tensors. index_add_ into zeros adds the weighted outputs in slot order, accumulating bf16 and
    fp16 in float32 and rounding once; a plain sum in that order, in that precision, is the same."""
    I = w2.shape[2]
    dtype = hidden.dtype
    acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    ids, weights = topk_ids[0].tolist(), topk_weights[0]
    out = None
    for s, k in sorted((s, k) for k, s in enumerate(ids) if s >= 0):
        h = linear(hidden, w13[s])
        # weights[k : k + 1], not weights[k]: a 0-d weight would not promote bf16 rows to float32
        y = linear(F.silu(h[:, :I]) * h[:, I:], w2[s]) * weights[k : k + 1]
        if y.dtype != dtype:
            y = y.to(dtype).to(acc)
        out = y if out is None else out + y
    if out is None:
        return torch.zeros_like(hidden)
    return out if out.dtype == dtype else out.to(dtype)


_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# The per-expert loop (one matmul pair per used expert) lives with the kernels it is the baseline of.
from moe_rt.kernels.loop import loop_experts  # noqa: E402


def _triton_experts(num_experts: int | None) -> ExpertCompute:
    try:
        from moe_rt.kernels.fused_moe import fused_experts
        from moe_rt.kernels.tuning import TuningTables
    except ImportError as e:  # triton missing or the kernel package not importable
        raise MoeRtError(f"expert compute 'triton' is unavailable: {e}") from None
    # One table cache per backend instance: a missing tuning table is warned about once.
    tables = TuningTables()

    def triton_experts(hidden, w13, w2, topk_ids, topk_weights):
        return fused_experts(hidden, w13, w2, topk_ids, topk_weights, tables=tables, num_experts=num_experts)

    return triton_experts


def get_expert_compute(name: str, num_experts: int | None = None) -> ExpertCompute:
    """num_experts: the model's routed experts (the Triton kernel's tuning tables are keyed by it,
    not by the size of the stack an expert cache hands it)."""
    if name == "torch":
        return torch_experts
    if name == "triton":
        return _triton_experts(num_experts)
    if name == "loop":
        return loop_experts
    if name == "reference":
        from .reference import reference_experts

        return reference_experts
    raise MoeRtError(f"unknown expert compute backend '{name}' (choose torch, loop, triton or reference)")
