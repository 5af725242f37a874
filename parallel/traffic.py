"""Traffic model: bytes that expert parallelism moves for a routing trace and a placement.

Pure counting, no model run. Four schemes (Speculative MoE, arXiv 2503.04398):
    baseline   DeepSpeed-MoE: contiguous default placement, each batch's tokens split evenly
               over ranks in order (token t's home = its slice), the same at every layer.
    s-TS       speculative token shuffling: at each layer the token is sent to the rank holding
               most of its *predicted* experts (tokens per rank capped), so fewer pairs cross.
    s-EG       speculative expert grouping: a planned placement, tokens split as in baseline.
    s-TS+s-EG  both.

Attention is tensor-parallel over the same N ranks (the paper's setting): before each MoE layer
a reduce-scatter leaves every token on one home rank, after it an all-gather restores all tokens
everywhere. s-TS only changes *which* rank a token's row lands on, so this dense volume is the
same in every scheme: ring reduce-scatter + all-gather of T rows move 2 * (N - 1) * T rows.

All-to-all: a token on home rank h whose expert x has no copy on h goes to x's primary rank.
Destinations are de-duplicated per (token, rank), and each one costs a dispatch and a combine:
2 rows. One row is H * dtype_bytes bytes.

Shape legend: T tokens (trace rows), L MoE layers, k experts per token, k' predicted experts,
E experts per layer, N ranks, B batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_rt.errors import MoeRtError
from parallel.grouping import check_topk_ids
from parallel.placement import ExpertParallelPlacement

SCHEMES = ("baseline", "s-TS", "s-EG", "s-TS+s-EG")


@dataclass(frozen=True)
class TrafficOptions:
    """Sizes and s-TS balance."""

    hidden: int  # H, model hidden size (one token row)
    dtype_bytes: int = 2  # bytes per activation element (bf16: 2)
    token_cap_slack: float = 0.25  # s-TS: tokens per rank per batch <= ceil((1 + slack) * T_b / N)

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.dtype_bytes < 1:
            raise MoeRtError(f"hidden and dtype bytes must be >= 1, got {self.hidden}, "
                             f"{self.dtype_bytes}")
        if self.token_cap_slack < 0:
            raise MoeRtError(f"token cap slack must be >= 0, got {self.token_cap_slack}")


@dataclass(frozen=True)
class TrafficReport:
    """Counts for one scheme over the whole trace. Rows are token vectors; bytes = rows * row_bytes."""

    scheme: str
    ranks: int  # N
    num_tokens: int  # T
    row_bytes: int  # H * dtype_bytes
    a2a_rows: np.ndarray  # [L] int64 rows sent by dispatch + combine all-to-alls
    dense_rows: np.ndarray  # [L] int64 rows sent by the dense reduce-scatter + all-gather
    local_pairs: np.ndarray  # [L] int64 token-expert pairs served on the token's home rank
    pairs_per_layer: int  # T * k

    @property
    def a2a_bytes(self) -> np.ndarray:
        """[L] int64 all-to-all bytes per layer."""
        return self.a2a_rows * self.row_bytes

    @property
    def a2a_bytes_per_token(self) -> float:
        """All-to-all bytes per token for a whole forward pass (all layers)."""
        return float(self.a2a_bytes.sum()) / self.num_tokens

    @property
    def collective_bytes_per_token(self) -> float:
        """All-to-all plus dense collective bytes per token, all layers."""
        return float((self.a2a_rows + self.dense_rows).sum() * self.row_bytes) / self.num_tokens

    @property
    def local_share(self) -> float:
        """Share of token-expert pairs that needed no all-to-all."""
        return float(self.local_pairs.sum()) / (self.pairs_per_layer * len(self.local_pairs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme, "ranks": self.ranks, "num_tokens": self.num_tokens,
            "a2a_bytes_per_token": self.a2a_bytes_per_token,
            "collective_bytes_per_token": self.collective_bytes_per_token,
            "local_share": self.local_share,
            "a2a_bytes_per_layer": [int(v) for v in self.a2a_bytes],
        }


def _batch_index(batch_ids: np.ndarray | None, num_tokens: int) -> np.ndarray:
    """[T] dense batch number 0..B-1; None means the whole trace is one batch."""
    if batch_ids is None:
        return np.zeros(num_tokens, dtype=np.int64)
    batch_ids = np.asarray(batch_ids)
    if batch_ids.shape != (num_tokens,):
        raise MoeRtError(f"batch ids must have shape ({num_tokens},), got {batch_ids.shape}")
    return np.unique(batch_ids, return_inverse=True)[1].astype(np.int64)


def uniform_home(batch: np.ndarray, ranks: int) -> np.ndarray:
    """[T] home rank of DeepSpeed's even split: the i-th of a batch's T_b tokens -> i * N // T_b."""
    order = np.argsort(batch, kind="stable")
    sizes = np.bincount(batch)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.empty(len(batch), dtype=np.int64)
    pos[order] = np.arange(len(batch)) - starts[batch[order]]
    return pos * ranks // sizes[batch]


def balanced_home(counts: np.ndarray, batch: np.ndarray, fallback: np.ndarray,
                  slack: float) -> np.ndarray:
    """[T] s-TS home: the rank with the most predicted experts, at most ceil((1+slack)*T_b/N)
    tokens per rank per batch.

    counts [T, N] predicted experts held per rank; ties go to the token's `fallback` rank, then the
    lowest rank. Tokens earlier in the trace choose first; a token whose best rank is full takes
    its next best open rank. Total capacity >= T_b, so every token gets a rank.
    """
    t, n = counts.shape
    sizes = np.bincount(batch)
    remaining = np.repeat(np.ceil((1.0 + slack) * sizes / n).astype(np.int64)[:, None], n, axis=1)
    score = counts.astype(np.float64) * 2.0
    score[np.arange(t), fallback] += 1.0
    home = np.full(t, -1, dtype=np.int64)
    todo = np.arange(t)
    while len(todo):
        s = np.where(remaining[batch[todo]] > 0, score[todo], -np.inf)
        choice = np.argmax(s, axis=1)
        key = batch[todo] * n + choice
        order = np.argsort(key, kind="stable")  # keeps token order within one (batch, rank)
        sk = key[order]
        pos = np.arange(len(sk)) - np.searchsorted(sk, sk, side="left")
        accept = pos < remaining.ravel()[sk]
        home[todo[order[accept]]] = choice[order[accept]]
        remaining -= np.bincount(sk[accept], minlength=remaining.size).reshape(remaining.shape)
        todo = np.sort(todo[order[~accept]])
    return home


def held_counts(ids: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """[T, N] int64: of each token's experts ids [T, k], how many have a copy on each rank.

    holders [E, N] bool from ExpertParallelPlacement.holder_mask()[layer].
    """
    return holders[ids].sum(axis=1).astype(np.int64)


def layer_traffic(ids: np.ndarray, holders: np.ndarray, primary: np.ndarray,
                  home: np.ndarray) -> tuple[int, int]:
    """(all-to-all rows, local pairs) of one layer; ids [T, k], holders [E, N], primary [E], home [T]."""
    t, _ = ids.shape
    local = holders[ids, home[:, None]]  # [T, k]
    dest = np.zeros((t, holders.shape[1]), dtype=bool)
    rows = np.broadcast_to(np.arange(t)[:, None], ids.shape)
    dest[rows[~local], primary[ids][~local]] = True  # one visit per (token, rank)
    return 2 * int(dest.sum()), int(local.sum())


def simulate(topk_ids: np.ndarray, placement: ExpertParallelPlacement, options: TrafficOptions,
             *, speculative: bool, predicted_ids: np.ndarray | None = None,
             batch_ids: np.ndarray | None = None, scheme: str = "") -> TrafficReport:
    """Traffic of topk_ids [T, L, k] under `placement`.

    speculative=False: uniform homes (baseline split). speculative=True: s-TS homes from
    predicted_ids [T, L, k'] (experts predicted for layer l itself), or, when None, the model-free
    estimate: the ranks of the token's actual experts at layer l-1 (layer 0 keeps the uniform
    home). batch_ids [T]: tokens with the same id share one forward batch (None: one batch).
    """
    if not placement.layers:
        raise MoeRtError("placement has no layers")
    num_experts = len(placement.layers[0])
    ids = check_topk_ids(topk_ids, num_experts)
    t, num_layers, k = ids.shape
    placement.validate_against(num_layers, num_experts)
    n = placement.ranks
    if predicted_ids is not None:
        predicted_ids = check_topk_ids(predicted_ids, num_experts)
        if predicted_ids.shape[:2] != (t, num_layers):
            raise MoeRtError(f"predicted ids must be [T, L, k'] with T, L = {t}, {num_layers}, "
                             f"got {predicted_ids.shape}")
    holders = placement.holder_mask()  # [L, E, N]
    primary = placement.primary_table()  # [L, E]
    batch = _batch_index(batch_ids, t)
    base_home = uniform_home(batch, n)
    a2a = np.zeros(num_layers, dtype=np.int64)
    local = np.zeros(num_layers, dtype=np.int64)
    for l in range(num_layers):
        home = base_home
        if speculative and predicted_ids is not None:
            home = balanced_home(held_counts(predicted_ids[:, l], holders[l]), batch, base_home,
                                 options.token_cap_slack)
        elif speculative and l > 0:
            home = balanced_home(held_counts(ids[:, l - 1], holders[l - 1]), batch, base_home,
                                 options.token_cap_slack)
        a2a[l], local[l] = layer_traffic(ids[:, l], holders[l], primary[l], home)
    dense = np.full(num_layers, 2 * (n - 1) * t, dtype=np.int64)
    return TrafficReport(scheme or ("s-TS" if speculative else "uniform"), n, t,
                         options.hidden * options.dtype_bytes, a2a, dense, local, t * k)


def compare_schemes(topk_ids: np.ndarray, default: ExpertParallelPlacement,
                    grouped: ExpertParallelPlacement, options: TrafficOptions,
                    predicted_ids: np.ndarray | None = None,
                    batch_ids: np.ndarray | None = None) -> dict[str, TrafficReport]:
    """The four SCHEMES on one trace; `grouped` is the s-EG placement (plan it on other tokens
    than topk_ids for an out-of-sample estimate)."""
    if default.ranks != grouped.ranks:
        raise MoeRtError(f"placements disagree on ranks: {default.ranks} vs {grouped.ranks}")
    runs = {"baseline": (default, False), "s-TS": (default, True),
            "s-EG": (grouped, False), "s-TS+s-EG": (grouped, True)}
    return {name: simulate(topk_ids, p, options, speculative=spec, predicted_ids=predicted_ids,
                           batch_ids=batch_ids, scheme=name)
            for name, (p, spec) in runs.items()}


def ratio(new: float, old: float) -> float:
    """new / old, or nan when old is 0 (nothing to save)."""
    return new / old if old else math.nan
