"""EPStats: what expert parallelism moved and how long each layer took, on one rank.

Every rank counts the bytes *it sends to other ranks* (its own chunk of a collective never
crosses a link). Summing the per-rank dicts with `merge_stats` gives the group's totals; the
server exports one rank's `as_dict()` (rank 0) or the merged dict.

Collective names:
    reduce_scatter  attention partial sums -> each token's full sum on its slice rank
    all_gather      slice outputs -> every token on every rank before the next attention
    a2a_dispatch    token rows sent to expert owners (hidden only)
    a2a_combine     weighted partial sums sent back
    a2a_meta        expert ids + weights riding with dispatched rows, and the split counts
    predict_side    s-TS: predicted expert ids riding on the all-gather
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

A2A_NAMES = ("a2a_dispatch", "a2a_combine")


@dataclass
class EPStats:
    rank: int
    world: int
    num_moe_layers: int  # L
    num_layers: int  # decoder layers
    bytes_by_collective: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    a2a_bytes_by_layer: list[int] = field(default_factory=list)  # [L] dispatch + combine rows
    tokens: int = 0  # tokens forwarded (each step's T counted once)
    steps: int = 0  # forward passes
    pairs: list[int] = field(default_factory=list)  # [L] token-expert pairs routed from this rank
    local_pairs: list[int] = field(default_factory=list)  # [L] ... served on this rank
    pred_hits: int = 0  # predicted pairs that the router then chose (s-TS)
    pred_pairs: int = 0  # routed pairs that had a prediction
    layer_time_s: list[float] = field(default_factory=list)  # [num_layers] summed over steps
    # CUDA layer timings not read yet: (layer, start event, end event). Reading an event waits for
    # the GPU, so they are read when the figures are asked for (or in batches), never per layer.
    pending: list[tuple] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.a2a_bytes_by_layer = self.a2a_bytes_by_layer or [0] * self.num_moe_layers
        self.pairs = self.pairs or [0] * self.num_moe_layers
        self.local_pairs = self.local_pairs or [0] * self.num_moe_layers
        self.layer_time_s = self.layer_time_s or [0.0] * self.num_layers

    def add_bytes(self, name: str, nbytes: int, moe_index: int | None = None) -> None:
        self.bytes_by_collective[name] += int(nbytes)
        if name in A2A_NAMES and moe_index is not None:
            self.a2a_bytes_by_layer[moe_index] += int(nbytes)

    def layer_start(self, device: torch.device):
        """A mark to pass to layer_end: the time now, or on CUDA an event recorded on the stream."""
        if device.type != "cuda":
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def layer_end(self, layer_id: int, mark) -> None:
        """Add the layer's time since `mark`; on CUDA without waiting for the GPU."""
        if not isinstance(mark, torch.cuda.Event):
            self.layer_time_s[layer_id] += time.perf_counter() - mark
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((layer_id, mark, end))
        if len(self.pending) >= 4096:  # bound the events held: read the oldest ones that are done
            self._read_pending(wait=False)

    def _read_pending(self, wait: bool) -> None:
        keep = []
        for layer_id, start, end in self.pending:
            if wait or end.query():
                end.synchronize()
                self.layer_time_s[layer_id] += start.elapsed_time(end) / 1e3
            else:
                keep.append((layer_id, start, end))
        self.pending = keep

    def reset(self) -> None:
        self.bytes_by_collective = defaultdict(int)
        self.__init__(self.rank, self.world, self.num_moe_layers, self.num_layers)

    def as_dict(self) -> dict:
        """Plain, JSON-ready counters of this rank (see merge_stats for the group's view)."""
        self._read_pending(wait=True)
        return {
            "ranks": self.world, "rank": self.rank, "tokens": self.tokens, "steps": self.steps,
            "bytes_by_collective": dict(self.bytes_by_collective),
            "a2a_bytes_by_layer": list(self.a2a_bytes_by_layer),
            "pairs": list(self.pairs), "local_pairs": list(self.local_pairs),
            "pred_hits": self.pred_hits, "pred_pairs": self.pred_pairs,
            "layer_time_s": list(self.layer_time_s),
        }


def merge_stats(per_rank: list[dict]) -> dict:
    """Group totals from every rank's as_dict(), plus the derived ratios the bench and server show.

    Bytes and pairs add up over ranks; tokens and time are the same work seen by every rank, so
    tokens are taken from rank 0 and layer time is the slowest rank's.
    """
    first = per_rank[0]
    names = sorted({k for d in per_rank for k in d["bytes_by_collective"]})
    by_coll = {k: sum(d["bytes_by_collective"].get(k, 0) for d in per_rank) for k in names}
    L = len(first["a2a_bytes_by_layer"])
    a2a_layer = [sum(d["a2a_bytes_by_layer"][m] for d in per_rank) for m in range(L)]
    pairs = sum(sum(d["pairs"]) for d in per_rank)
    local = sum(sum(d["local_pairs"]) for d in per_rank)
    pred_pairs = sum(d["pred_pairs"] for d in per_rank)
    pred_hits = sum(d["pred_hits"] for d in per_rank)
    tokens = first["tokens"]
    layer_time = [max(d["layer_time_s"][i] for d in per_rank) for i in range(len(first["layer_time_s"]))]
    a2a = sum(by_coll.get(k, 0) for k in A2A_NAMES)
    total = sum(by_coll.values())
    steps = first["steps"]
    return {
        "ranks": first["ranks"], "tokens": tokens, "steps": steps,
        "bytes_by_collective": by_coll,
        "a2a_bytes": a2a, "all_bytes": total,
        "a2a_bytes_per_token": a2a / tokens if tokens else 0.0,
        "all_bytes_per_token": total / tokens if tokens else 0.0,
        "a2a_bytes_by_layer": a2a_layer,
        "local_share": local / pairs if pairs else None,
        "predictor_hit_rate": pred_hits / pred_pairs if pred_pairs else None,
        "layer_time_ms": [1e3 * t / steps if steps else 0.0 for t in layer_time],
    }
