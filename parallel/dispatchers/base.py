"""What the EP layer driver (parallel/apply.py) asks of an expert-parallel dispatcher, on top of
the MoE block's dispatch/combine contract (moe_rt/layers/moe/dispatch.py).

A token split says which rank holds which tokens between the reduce-scatter after attention and
the all-gather before the next one. The baseline split is fixed (even, contiguous); s-TS
chooses it per layer from routing predictions.

Invariant: token_split must return the same split on every rank (it decides the sizes of the
collectives), so it may only depend on data every rank holds identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSplit:
    order: torch.Tensor  # [T] int64 token indices grouped by owning rank, rank 0's first
    counts: list[int]  # [N] tokens per rank, sum T

    def owned(self, rank: int) -> torch.Tensor:
        """[counts[rank]] token indices this rank holds."""
        start = sum(self.counts[:rank])
        return self.order[start:start + self.counts[rank]]

    def owner(self) -> torch.Tensor:
        """[T] int64 rank holding each token."""
        own = torch.empty_like(self.order)
        own[self.order] = torch.repeat_interleave(
            torch.arange(len(self.counts), device=self.order.device),
            torch.tensor(self.counts, device=self.order.device))
        return own


def even_split(T: int, world: int, device=None) -> TokenSplit:
    """DeepSpeed-MoE's fixed split: contiguous, sizes differ by at most one."""
    base, extra = divmod(T, world)
    counts = [base + (1 if r < extra else 0) for r in range(world)]
    return TokenSplit(torch.arange(T, device=device), counts)
