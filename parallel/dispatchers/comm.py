"""Collectives of the EP runtime, all built on all_to_all_single so that every split may be uneven
(gloo's list all_to_all cannot do unequal sizes) and every byte that crosses a link is counted.

Shape legend: T tokens of the step, N ranks, X columns of a row (hidden or packed bytes).

Invariant for every call here: all ranks of the group call the same collectives in the same
order with agreeing counts, or the collective hangs. Counts that a receiver cannot know are
exchanged first (`exchange_counts`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.groups import EPGroup
from parallel.stats import EPStats


def pack_rows(*parts: torch.Tensor) -> torch.Tensor:
    """[M, c_i] tensors of any dtypes -> one [M, sum bytes] uint8 tensor (one message, not several)."""
    cols = [p.shape[1] * p.element_size() for p in parts]  # explicit: -1 is ambiguous for 0 rows
    return torch.cat([p.contiguous().view(torch.uint8).reshape(p.shape[0], c) for p, c in zip(parts, cols)], dim=1)


def unpack_rows(buf: torch.Tensor, layout: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of pack_rows: layout = [(dtype, columns), ...] in packing order."""
    out, start = [], 0
    for dtype, cols in layout:
        width = cols * torch.empty((), dtype=dtype).element_size()
        out.append(buf[:, start:start + width].contiguous().view(dtype))
        start += width
    return out


class Comm:
    """The group's collectives with byte accounting into EPStats."""

    def __init__(self, ep: EPGroup, stats: EPStats) -> None:
        self.ep, self.stats = ep, stats

    @property
    def rank(self) -> int:
        return self.ep.rank

    @property
    def world(self) -> int:
        return self.ep.world

    def exchange_counts(self, send_counts: list[int], name: str = "a2a_meta") -> list[int]:
        """Tell every rank how many rows it will get from us; returns the rows we will get."""
        if self.world == 1:
            return list(send_counts)
        t = torch.tensor(send_counts, dtype=torch.int64, device=self.ep.device)
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.ep.group)
        self.stats.add_bytes(name, 8 * (self.world - 1))
        return out.tolist()

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                   account: dict[str, int], moe_index: int | None = None) -> torch.Tensor:
        """Rows of `send` grouped by destination rank -> rows received, grouped by source rank.

        account: collective name -> bytes of each row that belong to it (a packed row may carry
        hidden and metadata columns that are reported separately).
        """
        remote_rows = sum(send_counts) - send_counts[self.rank]
        for name, row_bytes in account.items():
            self.stats.add_bytes(name, remote_rows * row_bytes, moe_index)
        if self.world == 1:
            return send
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=self.ep.group)
        return recv

    def reduce_scatter(self, partial: torch.Tensor, order: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's partial sums [T, D] -> full sums [counts[rank], D] of this rank's tokens.

        order [T]: token indices grouped by owning rank (rank 0's first). The partials are added in
        rank order 0..N-1 whatever the token split, so every scheme gives the same bits.
        """
        mine = counts[self.rank]
        rows = partial.shape[1] * partial.element_size()
        recv = self.all_to_all(partial[order], counts, [mine] * self.world, {"reduce_scatter": rows})
        parts = recv.view(self.world, mine, partial.shape[1])
        acc = parts[0].clone()
        for j in range(1, self.world):
            acc += parts[j]
        return acc

    def all_gather(self, rows: torch.Tensor, order: torch.Tensor, counts: list[int],
                   account: dict[str, int]) -> torch.Tensor:
        """This rank's rows [counts[rank], X] -> all T rows [T, X] in original token order."""
        send = rows.repeat(self.world, 1) if self.world > 1 else rows
        got = self.all_to_all(send, [rows.shape[0]] * self.world, counts, account)
        out = torch.empty_like(got)
        out[order] = got
        return out
