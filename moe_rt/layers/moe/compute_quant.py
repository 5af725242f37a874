"""The torch backend's expert compute for quantized stacks (moe_rt/quant/experts.py).

Same contract as reference.reference_experts, with w13 and w2 QuantizedStacks:
    hidden [T, D], w13 [S, 2I, D], w2 [S, D, I], topk_ids [T, K] slots (-1 = skip) -> [T, D].

One matmul pair per slot that has rows. Each projection is either PyTorch's own low-bit CPU kernel
(torch._weight_int8pack_mm / torch._weight_int4pack_mm_for_cpu, bfloat16 activations, the
weights dequantised inside the kernel) or a dequantise-then-matmul in the compute dtype; the
choice is the rule at CPU_LOWBIT_MAX_ROWS. Off the CPU (the torch backend on a GPU) every
projection dequantises its slot; the Triton backend dequantises inside its kernel instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_rt.quant.experts import QuantizedStack

# An expert's projection over at most this many rows (by bits) runs PyTorch's low-bit CPU kernel;
# over more, the slot is dequantised and multiplied in the compute dtype, whose dequantisation
# cost is then spread over enough rows. Measured by scripts/quant_cpu_crossover.py (2 threads,
# fp32 model; demo-model 512x192 and 192x256, mixtral-56m 1024x256 projections), microseconds,
# kernel vs dequantise+matmul: int8 at 64 rows 114.5 vs 124.7, 62.6 vs 71.4, 272.9 vs 294.2; at
# 256 rows 425.4 vs 300.7, 207.7 vs 166.3, 1061.5 vs 868.0. int4 at 256 rows 315.9 vs 390.3,
# 164.7 vs 239.3, 818.7 vs 1022.4; at 1024 rows 1304.6 vs 1161.9, 632.1 vs 622.9, 3344.7 vs
# 2945.4. At 1 row the kernels take 9-15 us against 29-219 us.
CPU_LOWBIT_MAX_ROWS = {8: 64, 4: 256}


def _project(x: torch.Tensor, w: QuantizedStack, s: int) -> torch.Tensor:
    """x [n, K] @ w[s].T -> [n, N] in x's dtype."""
    if w.cpu is not None and x.shape[0] <= CPU_LOWBIT_MAX_ROWS[w.bits]:
        xb = x.to(torch.bfloat16)
        if w.bits == 8:
            y = torch._weight_int8pack_mm(xb, w.cpu.qweight[s], w.cpu.scales[s])
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, w.cpu.qweight[s], w.group_size, w.cpu.scales[s])
        return y.to(x.dtype)
    return torch.mm(x, w.dequantize(s).t())


def quantized_experts(hidden, w13: QuantizedStack, w2: QuantizedStack, topk_ids, topk_weights) -> torch.Tensor:
    """Pairs grouped by slot, one matmul pair per slot with rows, weighted outputs added in fp32
    in the order of the K choices. That order, not the slots', fixes the sum: an expert cache
    numbers slots its own way, and its output must equal the all-resident model's bit for bit."""
    T, K = topk_ids.shape
    if T == 1:
        return _one_token(hidden, w13, w2, topk_ids, topk_weights)
    if T == 0:
        return torch.zeros_like(hidden)
    per_pair = torch.zeros((T * K, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by slot, -1 first
    slots = flat[order].tolist()
    weights = topk_weights.reshape(-1)
    I = w2.shape[2]
    start = next((i for i, s in enumerate(slots) if s >= 0), len(slots))
    while start < len(slots):
        s = slots[start]
        end = start + 1
        while end < len(slots) and slots[end] == s:
            end += 1
        pairs = order[start:end]
        tokens = pairs // K
        h = _project(hidden[tokens], w13, s)
        y = _project(F.silu(h[:, :I]) * h[:, I:], w2, s)
        per_pair[pairs] = y.float() * weights[pairs].float()[:, None]
        start = end
    by_choice = per_pair.view(T, K, -1)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for k in range(K):
        out += by_choice[:, k]
    return out.to(hidden.dtype)


def _one_token(hidden, w13: QuantizedStack, w2: QuantizedStack, topk_ids, topk_weights) -> torch.Tensor:
    """T == 1 (batch-1 decode): the same products on the token's own row, without index tensors;
    the weighted outputs are added in fp32 in the order of the choices, as the batched path does."""
    I = w2.shape[2]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    weights = topk_weights[0]
    for k, s in enumerate(topk_ids[0].tolist()):
        if s < 0:
            continue
        h = _project(hidden, w13, s)
        out += _project(F.silu(h[:, :I]) * h[:, I:], w2, s).float() * weights[k : k + 1].float()
    return out.to(hidden.dtype)
