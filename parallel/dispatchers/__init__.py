"""Expert-parallel dispatchers: `alltoall` (DeepSpeed-MoE baseline) and `speculative` (s-TS).

Both implement the MoE block's dispatch/combine contract plus the token-split hooks of base.py.
`build_dispatcher` is the one place a kind is chosen.
"""
from __future__ import annotations

from moe_rt.errors import MoeRtError

from .base import TokenSplit, even_split

KINDS = ("alltoall", "speculative")


def build_dispatcher(kind: str, comm, placement, predictor=None, slack: float = 0.25, device=None):
    if kind == "alltoall":
        from .alltoall import AllToAllDispatcher

        return AllToAllDispatcher(comm, placement, device)
    if kind == "speculative":
        if predictor is None:
            raise MoeRtError("the speculative dispatcher (s-TS) needs a routing predictor")
        from .speculative import SpeculativeDispatcher

        return SpeculativeDispatcher(comm, placement, predictor, slack, device)
    raise MoeRtError(f"unknown EP dispatcher '{kind}' (choose {', '.join(KINDS)})")


__all__ = ["KINDS", "TokenSplit", "build_dispatcher", "even_split"]
