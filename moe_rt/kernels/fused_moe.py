"""Triton fused-MoE expert compute: two grouped GEMM kernels and their launcher.

Shape legend (see moe_rt/layers/moe/reference.py and moe_rt/kernels/align.py):
    T  tokens, D  hidden size, I  expert intermediate size, S  weight slots, K  choices per token
    P = T*K  (token, choice) pairs, pair p = t*K + k
    L  padded length of the slot-sorted pair list, M/N/BK the BLOCK_SIZE_M/N/K of a launch

Pipeline of fused_experts:
    align:    sort pairs by slot, pad each slot's group to a multiple of M      (align_triton.py)
    gate_up:  inter[p] = silu(x[t] @ w13[s, :I].T) * (x[t] @ w13[s, I:].T)     [P, I]
    down:     partial[p] = topk_weights[p] * (inter[p] @ w2[s].T)               [P, D] fp32
    combine:  out[t] = sum_k partial[t*K + k]                                   [T, D] (torch)
Each program owns one M-row block of the sorted list (all rows share one slot, by construction of
the alignment) and one N-column block of the output, so every write goes to a distinct cell and
no atomics are needed; the top-k sum is done once in torch over [T, K, D], in fp32.

Quantized experts (moe_rt/quant/experts.py): w13 and w2 may be int8 (w8a16) or int4 (w4a16)
stacks; each weight tile is dequantised in registers (_weight_tile) before its dot, in the
activations' dtype, so full-precision weights are never materialised. Launch configs come from
the same tables as the full-precision kernel of the activations' dtype.

The intermediate is stored in hidden's dtype (as serving stacks do, it halves its traffic); all
products accumulate in fp32. Under TRITON_INTERPRET=1 the kernels run on CPU tensors and upcast
operands to fp32 before tl.dot, because the interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_rt.device import launch_device
from moe_rt.kernels.align import AlignedRouting
from moe_rt.kernels.align_triton import align_block_size_triton
from moe_rt.kernels.tuning import TuningTables, default_config, device_name, dtype_name
from moe_rt.quant.experts import QuantizedStack


@triton.jit
def _block_coords(L, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the flat program id to (row block, column block), GROUP_M row blocks at a time.

    Neighbouring programs then share row blocks, i.e. the same slot's weight columns stay hot in
    L2 while several row blocks of that slot consume them.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(L, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, slot, rows, cols, mask,
                 stride_ws, stride_wn, stride_wk, stride_ss, stride_sn,
                 BITS: tl.constexpr, GROUP: tl.constexpr):
    """A [BK, N] tile of W[slot].T: rows [1, N] are output rows, cols [BK, 1] input columns.

    BITS 16: W itself. BITS 8: int8 codes times the row's scale (w8a16). BITS 4: codes packed two
    a byte (column 2j low nibble, 2j+1 high), w = (q - 8) * scale + zero of the column's group
    (w4a16). Quantized tiles come back in fp32, dequantised here so W never exists in full
    precision; scales and zeros are [S, N, K // GROUP] with unit group stride.
    """
    # One return at the end: the compiler types every statement after a return in a constexpr
    # branch too, and a shift of a bf16 tile does not type-check.
    if BITS == 16:
        w = tl.load(w_ptr + slot * stride_ws + rows * stride_wn + cols * stride_wk, mask=mask, other=0.0)
    elif BITS == 8:
        scale = tl.load(s_ptr + slot * stride_ss + rows * stride_sn + cols // GROUP, mask=mask, other=0.0)
        q = tl.load(w_ptr + slot * stride_ws + rows * stride_wn + cols * stride_wk, mask=mask, other=0)
        w = q.to(tl.float32) * scale
    else:
        s_off = slot * stride_ss + rows * stride_sn + cols // GROUP
        scale = tl.load(s_ptr + s_off, mask=mask, other=0.0)
        zero = tl.load(z_ptr + s_off, mask=mask, other=0.0)
        byte = tl.load(w_ptr + slot * stride_ws + rows * stride_wn + (cols // 2) * stride_wk, mask=mask, other=0)
        q = (byte >> ((cols % 2) * 4).to(tl.uint8)) & 15
        w = (q.to(tl.float32) - 8.0) * scale + zero
    return w


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, s13_ptr, z13_ptr, inter_ptr, sorted_ids_ptr, block_slot_ptr,
    num_pairs, L, D, I,
    stride_xt, stride_xd, stride_ws, stride_wn, stride_wd, stride_ss, stride_sn, stride_ip, stride_ii,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    """inter[p, n] = silu(gate) * up for the pairs of one row block and columns n of one block."""
    pid_m, pid_n = _block_coords(L, I, BLOCK_M, BLOCK_N, GROUP_M)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:  # trailing block past the padded length: nothing to do
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = pair < num_pairs  # padding rows carry the sentinel P
    token = pair // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [M, BK]
    # w13[slot] is [2I, D]; we read it transposed as [BK, N] tiles: gate rows n, up rows I + n.
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = offs_k < D - k0 * BLOCK_K
        cols = k0 * BLOCK_K + offs_k[:, None]
        w_ok = k_ok[:, None] & col_ok[None, :]
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = _weight_tile(w13_ptr, s13_ptr, z13_ptr, slot, offs_n[None, :], cols, w_ok,
                         stride_ws, stride_wn, stride_wd, stride_ss, stride_sn, BITS, QGROUP)
        u = _weight_tile(w13_ptr, s13_ptr, z13_ptr, slot, I + offs_n[None, :], cols, w_ok,
                         stride_ws, stride_wn, stride_wd, stride_ss, stride_sn, BITS, QGROUP)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        else:  # dequantised tiles are fp32; the dot takes both operands in the activations' dtype
            g = g.to(a.dtype)
            u = u.to(a.dtype)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd

    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = inter_ptr + pair[:, None] * stride_ip + offs_n[None, :] * stride_ii
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    inter_ptr, w2_ptr, s2_ptr, z2_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_slot_ptr,
    num_pairs, L, D, I,
    stride_ip, stride_ii, stride_ws, stride_wd, stride_wi, stride_ss, stride_sn, stride_op, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    """partial[p, n] = topk_weights[p] * (inter[p] @ w2[slot].T)[n], written in fp32."""
    pid_m, pid_n = _block_coords(L, D, BLOCK_M, BLOCK_N, GROUP_M)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = inter_ptr + pair[:, None] * stride_ip + offs_k[None, :] * stride_ii  # [M, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(I, BLOCK_K)):
        k_ok = offs_k < I - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = _weight_tile(w2_ptr, s2_ptr, z2_ptr, slot, offs_n[None, :], k0 * BLOCK_K + offs_k[:, None],
                         k_ok[:, None] & col_ok[None, :],
                         stride_ws, stride_wd, stride_wi, stride_ss, stride_sn, BITS, QGROUP)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ii

    w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_op + offs_n[None, :] * stride_od
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check_shapes(hidden, w13, w2, topk_ids, topk_weights) -> tuple[int, int, int, int, int]:
    if hidden.dim() != 2 or len(w13.shape) != 3 or len(w2.shape) != 3:
        raise ValueError("expected hidden [T, D], w13 [S, 2I, D], w2 [S, D, I]")
    T, D = hidden.shape
    S, two_i, D13 = w13.shape
    I = two_i // 2
    if two_i % 2 or D13 != D or tuple(w2.shape) != (S, D, I):
        raise ValueError(f"weight shapes disagree: hidden {tuple(hidden.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={T}, K]")
    if not (hidden.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"hidden/w13/w2 dtypes differ: {hidden.dtype}, {w13.dtype}, {w2.dtype}")
    dtype_name(hidden.dtype)  # raises for unsupported dtypes
    return T, D, S, I, topk_ids.shape[1]


@dataclass(frozen=True)
class _WeightArgs:
    """A weight stack as kernel arguments: (weights, scales, zeros) and their strides (slot, row,
    column; scale slot, scale row). Full-precision stacks pass themselves for the unused scales
    and zeros (never read with BITS 16)."""
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    strides: tuple[int, int, int, int, int]
    bits: int
    group: int

    @staticmethod
    def of(w: torch.Tensor | QuantizedStack) -> "_WeightArgs":
        if not isinstance(w, QuantizedStack):
            return _WeightArgs((w, w, w), (*w.stride(), 0, 0), 16, 1)
        q, sc = w.qweight, w.scales
        zeros = w.zeros if w.zeros is not None else sc
        if sc.stride(2) != 1 or zeros.stride() != sc.stride():
            raise ValueError("scales and zeros must be contiguous [S, N, G] tensors of one layout")
        return _WeightArgs((q, sc, zeros), (*q.stride(), sc.stride(0), sc.stride(1)), w.bits, w.group_size)


def launch_config(tables: TuningTables | None, T: int, K: int, E: int, I: int, hidden: torch.Tensor) -> dict:
    """The tuned config for (E experts, I, this GPU, dtype) at the nearest batch size, else the
    default for T*K rows over E experts. Tables are read only for CUDA tensors."""
    if tables is not None and hidden.device.type == "cuda":
        return tables.get(T, K, E, I, device_name(hidden.device), dtype_name(hidden.dtype))
    return default_config(T, K, E)


def fused_experts(
    hidden: torch.Tensor,  # [T, D]
    w13: torch.Tensor | QuantizedStack,  # [S, 2I, D]
    w2: torch.Tensor | QuantizedStack,  # [S, D, I]
    topk_ids: torch.Tensor,  # [T, K] slot per choice, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
    *,
    config: dict | None = None,
    tables: TuningTables | None = None,
    num_experts: int | None = None,
) -> torch.Tensor:  # [T, D] in hidden's dtype
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]), as reference_experts.

    config: a launch config (keys of tuning.CONFIG_KEYS); when None it comes from `tables`
    (a TuningTables the caller keeps for the process) or, without tables, from default_config.
    num_experts: the model's routed experts, which key the tables (tokens spread over E experts,
    whatever the stack holds; an expert cache's stack has fewer slots); default: the stack's S.
    Works on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1. w13 and w2 may be
    QuantizedStacks (w8a16, w4a16): their weights are dequantised tile by tile inside the kernels.
    """
    T, D, S, I, K = _check_shapes(hidden, w13, w2, topk_ids, topk_weights)
    interpret = interpret_mode()
    if hidden.device.type != "cuda" and not interpret:
        raise RuntimeError("fused_experts needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if T == 0 or K == 0 or S == 0:
        return torch.zeros_like(hidden)
    if config is None:
        config = launch_config(tables, T, K, num_experts or S, I, hidden)
    block_m, block_n, block_k = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    launch = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    # fp32 operands must not be silently rounded to tf32; other dtypes take the target's default.
    precision = "ieee" if hidden.dtype == torch.float32 else None

    q13, q2 = _WeightArgs.of(w13), _WeightArgs.of(w2)
    # One Triton launch (align_triton.py); align.align_block_size is its torch reference.
    routing: AlignedRouting = align_block_size_triton(topk_ids, block_m, S)
    L = routing.sorted_pair_ids.numel()
    P = T * K
    weights = topk_weights.reshape(-1).contiguous()
    inter = torch.empty((P, I), dtype=hidden.dtype, device=hidden.device)
    # Zeroed because rows of dropped (-1) pairs are never written yet are summed in the combine.
    partial = torch.zeros((P, D), dtype=torch.float32, device=hidden.device)

    # Triton launches on the thread's current device, not the tensors': make theirs current.
    with launch_device(hidden):
        grid = (triton.cdiv(L, block_m) * triton.cdiv(I, block_n),)
        _gate_up_kernel[grid](
            hidden, *q13.tensors, inter, routing.sorted_pair_ids, routing.block_slot_ids,
            P, L, D, I,
            hidden.stride(0), hidden.stride(1), *q13.strides,
            inter.stride(0), inter.stride(1),
            TOP_K=K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            GROUP_M=config["GROUP_SIZE_M"], UPCAST=interpret, PRECISION=precision,
            BITS=q13.bits, QGROUP=q13.group, **launch,
        )
        grid = (triton.cdiv(L, block_m) * triton.cdiv(D, block_n),)
        _down_kernel[grid](
            inter, *q2.tensors, partial, weights, routing.sorted_pair_ids, routing.block_slot_ids,
            P, L, D, I,
            inter.stride(0), inter.stride(1), *q2.strides,
            partial.stride(0), partial.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            GROUP_M=config["GROUP_SIZE_M"], UPCAST=interpret, PRECISION=precision,
            BITS=q2.bits, QGROUP=q2.group, **launch,
        )
    return partial.view(T, K, D).sum(dim=1).to(hidden.dtype)
