"""Token-to-expert alignment: group the (token, choice) pairs by weight slot for the grouped GEMM.

Shape legend (see moe_rt/layers/moe/reference.py):
    T  tokens, K  choices per token, S  expert slots in the weight stack
    P = T*K   (token, choice) pairs; pair p is token p // K, choice p % K
    M  BLOCK_SIZE_M, the row-block height of the fused kernels
    L  max_padded_len(P, S, M): an upper bound on the padded length, known without a host sync

The fused kernels give each row block of M pairs to one program, and a program multiplies by one
expert's weights only. So every slot's pairs must start on a block boundary: we sort the pairs by
slot and pad each slot's group up to a multiple of M with the sentinel P (one past the last pair).
Choices marked -1 (expert not computed here) are dropped before padding.

Everything here is plain torch on topk_ids' device, with no .item(): the output sizes depend only
on (P, S, M), so the step can be captured in a CUDA graph. Unused trailing blocks get slot -1 and
the kernels return early on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignedRouting:
    """Pairs sorted by slot, each slot's group padded to a multiple of block_m."""

    sorted_pair_ids: torch.Tensor  # [L] int32; pair index t*K + k, or the sentinel P for padding
    block_slot_ids: torch.Tensor  # [L // M] int32; slot of each row block, -1 for unused blocks
    num_padded: torch.Tensor  # [1] int32; used length of sorted_pair_ids (a multiple of M)
    block_m: int  # M
    num_pairs: int  # P; also the padding sentinel


def max_padded_len(num_pairs: int, num_slots: int, block_m: int) -> int:
    """L: at most min(S, P) groups are non-empty and each wastes at most M-1 rows of padding."""
    bound = num_pairs + min(num_slots, num_pairs) * (block_m - 1)
    return max(block_m, -(-bound // block_m) * block_m)


def align_block_size(topk_ids: torch.Tensor, block_m: int, num_slots: int) -> AlignedRouting:
    """Sort the pairs of topk_ids [T, K] by slot and pad each slot's group to a multiple of block_m.

    Within a slot, pairs keep their original order (stable sort), which makes the output exact
    and testable. Ids must be in [-1, num_slots).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    # Park -1 choices in an extra bucket S, sorted last and never given a destination.
    bucket = torch.where(flat < 0, torch.full_like(flat, num_slots), flat)
    counts = torch.bincount(bucket, minlength=num_slots + 1)[:num_slots]  # [S]
    padded = (counts + block_m - 1) // block_m * block_m  # [S]
    padded_end = torch.cumsum(padded, 0)  # [S]
    padded_start = padded_end - padded
    group_start = torch.cumsum(counts, 0) - counts  # [S] start of each group in the sorted order

    order = torch.sort(bucket, stable=True).indices  # [P] pair ids, grouped by slot
    sorted_bucket = bucket[order]
    valid = sorted_bucket < num_slots
    slot = sorted_bucket.clamp(max=num_slots - 1)
    rank = torch.arange(num_pairs, device=device) - group_start[slot]
    length = max_padded_len(num_pairs, num_slots, block_m)
    # Dropped pairs are written to a trash cell at index `length`, which is sliced off below.
    dest = torch.where(valid, padded_start[slot] + rank, torch.full_like(rank, length))
    sorted_ids = torch.full((length + 1,), num_pairs, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, dest, order)

    block_starts = torch.arange(0, length, block_m, device=device)
    block_slot = torch.searchsorted(padded_end, block_starts, right=True)
    num_padded = padded_end[-1:] if num_slots > 0 else torch.zeros(1, dtype=torch.int64, device=device)
    block_slot = torch.where(block_starts < num_padded, block_slot, torch.full_like(block_slot, -1))
    return AlignedRouting(
        sorted_pair_ids=sorted_ids[:length].to(torch.int32),
        block_slot_ids=block_slot.to(torch.int32),
        num_padded=num_padded.to(torch.int32),
        block_m=block_m,
        num_pairs=num_pairs,
    )
