"""Baseline expert-parallel dispatcher (DeepSpeed-MoE inference): all-to-all to the expert owners.

Shape legend: T tokens on this rank, K experts per token, E experts per layer, N ranks, D hidden,
M rows this rank sends (one per distinct (token, destination rank)), M' rows it receives.

Which rank serves pair (token t, expert e): this rank if it holds a copy of e, else e's primary.
A token goes once to each distinct serving rank, carrying only the ids that rank serves (the
rest are -1, which expert compute skips); the serving rank returns the weighted sum over those
ids, and the token's rank adds the returns up. So a token whose K experts sit on one rank
crosses the link once, not K times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_rt.layers.moe.dispatch import DispatchOutput
from parallel.placement import ExpertParallelPlacement

from .base import EvenSplitDispatcher
from .comm import Comm, pack_rows, unpack_rows


@dataclass(frozen=True)
class AllToAllHandle:
    """What combine needs to send results back and add them up in the source token order."""

    tok: torch.Tensor  # [M] int64 source token of each sent row, rows grouped by destination rank
    send_counts: list[int]  # [N] rows sent to each rank (sum M)
    recv_counts: list[int]  # [N] rows received from each rank (sum M')
    num_tokens: int  # T, the rows combine returns


class AllToAllDispatcher(EvenSplitDispatcher):
    kind = "alltoall"

    def __init__(self, comm: Comm, placement: ExpertParallelPlacement, device=None) -> None:
        super().__init__(comm, placement, device)
        self.holder = torch.as_tensor(placement.holder_mask(), device=self.device)  # [L, E, N] bool
        self.primary = torch.as_tensor(placement.primary_table(), device=self.device)  # [L, E] int64

    # -- dispatch / combine --------------------------------------------------------------------
    def serving_rank(self, moe_index: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, K] rank that computes each pair: here if this rank holds a copy, else the primary.
        A dropped choice (-1, dynamic top-k) is "here": it is computed nowhere and sends no row."""
        ids = topk_ids.clamp(min=0)
        me = torch.full_like(topk_ids, self.comm.rank)
        here = self.holder[moe_index, :, self.comm.rank][ids] | (topk_ids < 0)
        return torch.where(here, me, self.primary[moe_index][ids])

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchOutput[AllToAllHandle]:
        comm, N = self.comm, self.comm.world
        T, K = topk_ids.shape
        dest = self.serving_rank(moe_index, topk_ids)  # [T, K]
        chosen = topk_ids >= 0
        self.stats.pairs[moe_index] += int(chosen.sum())
        self.stats.local_pairs[moe_index] += int(((dest == comm.rank) & chosen).sum())
        # Dedup: one row per distinct (token, destination), grouped by destination.
        goes = torch.zeros(T, N, dtype=torch.bool, device=hidden.device)
        rows = torch.arange(T, device=hidden.device)[:, None].expand_as(dest)
        goes[rows[chosen], dest[chosen]] = True  # a dropped choice sends its token nowhere
        dst, tok = goes.t().nonzero(as_tuple=True)  # sorted by destination, then token
        send_counts = torch.bincount(dst, minlength=N).tolist()
        ids = torch.where(dest[tok] == dst[:, None], topk_ids[tok], torch.full_like(topk_ids[tok], -1))
        payload = pack_rows(hidden[tok], ids.to(torch.int32), topk_weights[tok].float())
        recv_counts = comm.exchange_counts(send_counts)
        D = hidden.shape[1]
        got = comm.all_to_all(payload, send_counts, recv_counts,
                              {"a2a_dispatch": D * hidden.element_size(), "a2a_meta": 8 * K}, moe_index)
        h, ids_in, w_in = unpack_rows(got, [(hidden.dtype, D), (torch.int32, K), (torch.float32, K)])
        return DispatchOutput(h, ids_in.long(), w_in, AllToAllHandle(tok, send_counts, recv_counts, T))

    def combine(self, moe_index: int, expert_out: torch.Tensor,
                dispatched: DispatchOutput[AllToAllHandle]) -> torch.Tensor:
        hd = dispatched.handle
        D = expert_out.shape[1]
        # The reverse of dispatch's exchange: rows go back to the ranks they came from.
        back = self.comm.all_to_all(expert_out, hd.recv_counts, hd.send_counts,
                                    {"a2a_combine": D * expert_out.element_size()}, moe_index)
        out = expert_out.new_zeros(hd.num_tokens, D)
        # index_add_ runs in row order: a token's returns are added in destination-rank order.
        out.index_add_(0, hd.tok, back)
        return out
