"""Expert-parallel dispatchers: `alltoall` (DeepSpeed-MoE baseline) and `speculative` (s-TS).

Each is one class satisfying `EPDispatcher` (base.py): the MoE block's dispatch/combine contract
(moe_rt/layers/moe/dispatch.py) plus the layer driver's token-split hooks. A new scheme is one
more class (usually an `EvenSplitDispatcher` subclass) named in SCHEMES; `build_dispatcher` is
the one place a name becomes a dispatcher.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from moe_rt.errors import MoeRtError

from .alltoall import AllToAllDispatcher, AllToAllHandle
from .base import DispatcherSetup, EPDispatcher, EvenSplitDispatcher, TokenSplit, even_split
from .speculative import SpeculativeDispatcher

SCHEMES: tuple[type[EPDispatcher], ...] = (AllToAllDispatcher, SpeculativeDispatcher)
# name (--ep-dispatcher, EPOptions.dispatcher) -> class; read-only: a scheme is added above
DISPATCHERS: Mapping[str, type[EPDispatcher]] = MappingProxyType({cls.kind: cls for cls in SCHEMES})
KINDS = tuple(DISPATCHERS)


def build_dispatcher(kind: str | type[EPDispatcher], setup: DispatcherSetup) -> EPDispatcher:
    """A registered name, or a class satisfying EPDispatcher (an unregistered scheme), built from setup."""
    if isinstance(kind, str):
        if kind not in DISPATCHERS:
            raise MoeRtError(f"unknown EP dispatcher '{kind}' (choose {', '.join(KINDS)})")
        kind = DISPATCHERS[kind]
    return kind.build(setup)


__all__ = ["DISPATCHERS", "KINDS", "SCHEMES", "AllToAllDispatcher", "AllToAllHandle", "DispatcherSetup",
           "EPDispatcher", "EvenSplitDispatcher", "SpeculativeDispatcher", "TokenSplit",
           "build_dispatcher", "even_split"]
