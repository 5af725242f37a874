"""Token-to-expert alignment as one Triton launch: the same output as align.align_block_size.

Why a kernel: at decode batch sizes the two GEMMs of a Mixtral layer read ~0.7 GB of weights in
~0.25 ms, while the torch alignment is about a dozen small ops (bincount, cumsum, sort, scatter,
searchsorted, ...) whose launch overhead alone is tens of microseconds. This kernel does the whole
alignment in one program (plus the sentinel fill), so the fused step is three launches, not ~15.

Shape legend as in align.py: P = T*K pairs, S slots, M = BLOCK_SIZE_M, L = max_padded_len(P, S, M).

One program walks the pairs three times in chunks of BLOCK_P (S_PAD = next power of two >= S):
    1. counts[s]      histogram of the slot ids (a -1 id matches no slot and is dropped)
       padded_start   exclusive cumsum of counts rounded up to M (each group starts on a block)
    2. placement      within a chunk, a pair's rank in its slot is the inclusive cumsum of the
                      one-hot [BLOCK_P, S_PAD] along the pairs, minus one; across chunks a running
                      count per slot carries on. dest = padded_start[s] + running[s] + rank, so
                      pairs keep their original order inside a slot (a stable sort, as align.py).
    3. block slots    block b's slot = number of padded group ends <= b*M, or -1 past num_padded.
Per-slot values are read for a pair with a one-hot dot (sum over S_PAD) instead of a register
gather, which Triton does not have. Work is O(P * S_PAD) on one SM: microseconds for decode
batches, and small next to the GEMMs for prefill batches.

Invariant (shared with align.py and relied on by the GEMM kernels): every M-row block of the
sorted list holds pairs of one slot only; padding rows hold the sentinel P.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_rt.device import launch_device
from moe_rt.kernels.align import AlignedRouting, max_padded_len

# Register budget: the one-hot tile is BLOCK_P x S_PAD int32 spread over the program's threads.
_TILE_ELEMS = 8192


@triton.jit
def _align_kernel(
    ids_ptr, sorted_ptr, block_slot_ptr, num_padded_ptr,
    num_pairs, num_slots, num_blocks,
    BLOCK_M: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
):
    slots = tl.arange(0, S_PAD)
    offs_p = tl.arange(0, BLOCK_P)

    # 1. histogram
    counts = tl.zeros((S_PAD,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        p = p0 + offs_p
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
        onehot = (ids[:, None] == slots[None, :]).to(tl.int32)  # [BLOCK_P, S_PAD]
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    num_padded = tl.sum(padded, axis=0)

    # 2. stable placement
    running = tl.zeros((S_PAD,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        p = p0 + offs_p
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
        onehot = (ids[:, None] == slots[None, :]).to(tl.int32)
        rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1), axis=1)  # [BLOCK_P]
        base = tl.sum(onehot * (padded_start + running)[None, :], axis=1)
        valid = (p < num_pairs) & (ids >= 0)
        tl.store(sorted_ptr + base + rank, p.to(tl.int32), mask=valid)
        running += tl.sum(onehot, axis=0)

    # 3. slot of each row block
    slot_ok = slots < num_slots
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        start = b * BLOCK_M
        passed = (padded_end[None, :] <= start[:, None]) & slot_ok[None, :]
        slot = tl.sum(passed.to(tl.int32), axis=1)
        slot = tl.where(start < num_padded, slot, -1)
        tl.store(block_slot_ptr + b, slot, mask=b < num_blocks)
    tl.store(num_padded_ptr, num_padded)


def launch_params(num_pairs: int, num_slots: int, num_blocks: int) -> dict:
    """The kernel's tile constexprs and warps for a problem size (also used by aot_check)."""
    s_pad = triton.next_power_of_2(max(num_slots, 2))
    cap = min(1024, _TILE_ELEMS // s_pad)
    return {"S_PAD": s_pad,
            "BLOCK_P": max(16, min(cap, triton.next_power_of_2(max(num_pairs, 1)))),
            "BLOCK_B": max(16, min(cap, triton.next_power_of_2(num_blocks))),
            "num_warps": 8}


def align_block_size_triton(topk_ids: torch.Tensor, block_m: int, num_slots: int) -> AlignedRouting:
    """align.align_block_size in one Triton program; equal outputs (tested in the interpreter).

    topk_ids [T, K] with ids in [-1, num_slots). Works on CUDA tensors, or CPU tensors with
    TRITON_INTERPRET=1. No host sync, so it can be captured in a CUDA graph.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).contiguous()
    num_pairs = flat.numel()
    length = max_padded_len(num_pairs, num_slots, block_m)
    num_blocks = length // block_m
    sorted_ids = torch.full((length,), num_pairs, dtype=torch.int32, device=device)
    block_slot = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    with launch_device(flat):  # Triton launches on the current device, not the tensors'
        _align_kernel[(1,)](
            flat, sorted_ids, block_slot, num_padded,
            num_pairs, num_slots, num_blocks,
            BLOCK_M=block_m, **launch_params(num_pairs, num_slots, num_blocks),
        )
    return AlignedRouting(sorted_pair_ids=sorted_ids, block_slot_ids=block_slot,
                          num_padded=num_padded, block_m=block_m, num_pairs=num_pairs)
