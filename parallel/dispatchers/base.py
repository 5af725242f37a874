"""What the EP layer driver (parallel/apply.py) asks of an expert-parallel dispatcher, on top of
the MoE block's dispatch/combine contract (moe_rt/layers/moe/dispatch.py), and the base class
a new scheme starts from.

A token split says which rank holds which tokens between the reduce-scatter after attention and
the all-gather before the next one. The baseline split is fixed (even, contiguous); s-TS
chooses it per layer from routing predictions.

Shape legend: T tokens of the step, T_r this rank's tokens, N ranks, X side columns.

Invariant: token_split must return the same split on every rank (it decides the sizes of the
collectives), so it may only depend on data every rank holds identically. Likewise side_columns
must return a tensor on every rank or on none, with the same X.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from moe_rt.layers.moe.dispatch import Dispatcher
from parallel.placement import ExpertParallelPlacement
from router_predict.base import Predictor

from .comm import Comm

H = TypeVar("H")

# s-TS's other guess source: (next moe_index, layer output [T_r, D]) -> scores [T_r, E]
GuessSource = Callable[[int, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class DispatcherSetup:
    """What every scheme is built from: build_dispatcher hands each registered class the same one."""

    comm: Comm  # the group's counted collectives (and its EPStats)
    placement: ExpertParallelPlacement  # which ranks hold which experts
    device: torch.device | str | None = None  # where its tables live; None = the group's device
    predictor: Predictor | GuessSource | None = None  # s-TS's routing guesses (others ignore it)
    slack: float = 0.25  # s-TS: tokens per rank <= ceil((1 + slack) * T / N)


@runtime_checkable
class EPDispatcher(Dispatcher[H], Protocol[H]):
    """An expert-parallel scheme: the block's dispatch/combine plus the layer driver's hooks."""

    kind: ClassVar[str]  # its name in the registry (--ep-dispatcher)

    @classmethod
    def build(cls, setup: DispatcherSetup) -> EPDispatcher[H]:
        """The one constructor the registry calls; a one-line MoeRtError for a setup it cannot use."""
        ...

    def token_split(self, moe_index: int | None, T: int, device=None) -> TokenSplit:
        """Which rank holds which of the step's T tokens around this layer's MoE (same on every rank)."""
        ...

    def side_columns(self, moe_index: int, layer_out: torch.Tensor) -> torch.Tensor | None:
        """Extra int32 columns [T_r, X] to ride on the all-gather after this layer (None: nothing);
        layer_out [T_r, D] is this rank's slice of the layer's output."""
        ...

    def accept_side(self, moe_index: int, columns: torch.Tensor) -> None:
        """The all-gathered side columns [T, X] of every rank, in original token order."""
        ...


class EvenSplitDispatcher:
    """Base of a scheme that keeps the baseline's fixed even split and sends nothing on the
    all-gather: a subclass writes dispatch and combine (typed DispatchOutput handle) and gets
    build, token_split, side_columns and accept_side from here."""

    kind = ""  # its name in the registry (parallel/dispatchers/__init__.py)

    def __init__(self, comm: Comm, placement: ExpertParallelPlacement, device=None) -> None:
        self.comm = comm
        self.stats = comm.stats
        self.placement = placement
        # Tables are indexed by the router's ids on every layer: they live where it computes
        # (the group's device unless told otherwise), or CUDA ids would index CPU tables.
        self.device = torch.device(device) if device is not None else comm.ep.device

    @classmethod
    def build(cls, setup: DispatcherSetup):
        return cls(setup.comm, setup.placement, setup.device)

    def token_split(self, moe_index: int | None, T: int, device=None) -> TokenSplit:
        return even_split(T, self.comm.world, device)

    def side_columns(self, moe_index: int, layer_out: torch.Tensor) -> torch.Tensor | None:
        return None

    def accept_side(self, moe_index: int, columns: torch.Tensor) -> None:
        pass
