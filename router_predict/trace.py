"""The routing-trace format: which experts every token used at every MoE layer (docs/traces.md).

A trace is one `.npz` file. Rows are tokens in execution order; rows sharing a `step` were
computed in the same forward batch, and replay treats them as one batch. Outside tools can write
traces with plain numpy, so `load_trace` checks everything and names the first problem in one line.

Shape legend: N rows (tokens), L MoE layers, k experts per token, H router input size (= hidden
size), E routed experts per layer.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from moe_rt.errors import MoeRtError

REQUIRED_ARRAYS = ("topk_ids", "topk_weights", "seq_ids", "positions", "steps", "meta")
OPTIONAL_ARRAYS = ("hidden", "token_ids", "layer_output")
REQUIRED_META = ("num_experts", "top_k", "layer_ids", "model")


@dataclass(frozen=True)
class TraceMeta:
    """The JSON `meta` entry. Keys beyond the required ones survive a round trip in `extra`."""

    num_experts: int  # E, routed experts per MoE layer
    top_k: int  # k, experts chosen per token
    layer_ids: tuple[int, ...]  # [L] decoder-layer index of each MoE layer
    model: str  # model name or folder the trace was recorded from
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        body = dict(self.extra)
        body.update(num_experts=self.num_experts, top_k=self.top_k,
                    layer_ids=list(self.layer_ids), model=self.model)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "trace") -> "TraceMeta":
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoeRtError(f"{where}: meta is not valid JSON ({e.msg})") from None
        if not isinstance(body, dict):
            raise MoeRtError(f"{where}: meta must be a JSON object")
        missing = [k for k in REQUIRED_META if k not in body]
        if missing:
            raise MoeRtError(f"{where}: meta lacks required key(s) {', '.join(missing)}")

        def as_int(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MoeRtError(f"{where}: meta {key} must be an integer, got {value!r}")
            return value

        num_experts = as_int("num_experts", body.pop("num_experts"))
        top_k = as_int("top_k", body.pop("top_k"))
        layer_ids = body.pop("layer_ids")
        if not isinstance(layer_ids, list):
            raise MoeRtError(f"{where}: meta layer_ids must be a list of integers")
        layer_ids = tuple(as_int("layer_ids", v) for v in layer_ids)
        model = body.pop("model")
        if not isinstance(model, str):
            raise MoeRtError(f"{where}: meta model must be a string, got {model!r}")
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise MoeRtError(f"{where}: meta needs num_experts >= 1 and 1 <= top_k <= num_experts, "
                             f"got num_experts={num_experts}, top_k={top_k}")
        return cls(num_experts, top_k, layer_ids, model, body)


@dataclass
class Trace:
    """A routing trace held in memory. Arrays are numpy; rows are in execution order."""

    topk_ids: np.ndarray  # [N, L, k] int32 experts chosen for row n at MoE layer l, routing order
    topk_weights: np.ndarray  # [N, L, k] float32 combine weights, same order as topk_ids
    seq_ids: np.ndarray  # [N] int64 request (sequence) id of each row
    positions: np.ndarray  # [N] int64 position of the row's token in its sequence
    steps: np.ndarray  # [N] int64 forward-batch counter, non-decreasing
    meta: TraceMeta
    hidden: np.ndarray | None = None  # [N, L, H] float16 router input entering each MoE layer
    token_ids: np.ndarray | None = None  # [N] int64 input token of each row
    layer_output: np.ndarray | None = None  # [N, L, H] float16 residual stream leaving each MoE layer's decoder layer

    @property
    def num_rows(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    @property
    def num_experts(self) -> int:
        return self.meta.num_experts

    def take(self, rows: np.ndarray | slice) -> "Trace":
        """The rows `rows` (indices in increasing order, or a slice) as a new trace."""
        pick = (lambda a: None if a is None else a[rows])
        return Trace(self.topk_ids[rows], self.topk_weights[rows], self.seq_ids[rows],
                     self.positions[rows], self.steps[rows], self.meta,
                     pick(self.hidden), pick(self.token_ids), pick(self.layer_output))


def _check_array(where: str, name: str, a: np.ndarray, dtype: np.dtype, shape: tuple,
                 legend: str) -> None:
    """`shape` uses None for free dimensions."""
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        raise MoeRtError(f"{where}: {name} has shape {tuple(a.shape)} but must be {legend}")
    if a.dtype != dtype:
        raise MoeRtError(f"{where}: {name} has dtype {a.dtype} but must be {np.dtype(dtype).name}")


def validate_trace(trace: Trace, where: str = "trace") -> None:
    """Raise MoeRtError naming the first problem; `where` prefixes the message (e.g. the file)."""
    ids = trace.topk_ids
    _check_array(where, "topk_ids", ids, np.dtype(np.int32), (None, None, None), "[N, L, k]")
    n, num_layers, k = ids.shape
    if n == 0:
        raise MoeRtError(f"{where}: trace has no rows")
    _check_array(where, "topk_weights", trace.topk_weights, np.dtype(np.float32), (n, num_layers, k),
                 f"[N, L, k] = {(n, num_layers, k)} like topk_ids")
    for name in ("seq_ids", "positions", "steps"):
        _check_array(where, name, getattr(trace, name), np.dtype(np.int64), (n,), f"[N] = ({n},)")
    if trace.token_ids is not None:
        _check_array(where, "token_ids", trace.token_ids, np.dtype(np.int64), (n,), f"[N] = ({n},)")
        if (trace.token_ids < 0).any():
            raise MoeRtError(f"{where}: token_ids has negative values")
    for name in ("hidden", "layer_output"):
        a = getattr(trace, name)
        if a is not None:
            _check_array(where, name, a, np.dtype(np.float16), (n, num_layers, None),
                         f"[N, L, H] with N, L = {n}, {num_layers}")
    if (trace.hidden is not None and trace.layer_output is not None
            and trace.hidden.shape[2] != trace.layer_output.shape[2]):
        raise MoeRtError(f"{where}: layer_output has H = {trace.layer_output.shape[2]} but hidden has "
                         f"H = {trace.hidden.shape[2]}")
    meta = trace.meta
    if meta.top_k != k:
        raise MoeRtError(f"{where}: meta top_k is {meta.top_k} but topk_ids has k = {k}")
    if len(meta.layer_ids) != num_layers:
        raise MoeRtError(f"{where}: meta layer_ids has {len(meta.layer_ids)} entries but topk_ids "
                         f"has L = {num_layers} layers")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= meta.num_experts:
        bad = lo if lo < 0 else hi
        raise MoeRtError(f"{where}: topk_ids contains expert {bad}, outside [0, {meta.num_experts})")
    if k > 1:
        s = np.sort(ids, axis=-1)
        if (s[..., 1:] == s[..., :-1]).any():
            raise MoeRtError(f"{where}: topk_ids repeats an expert within one token's top-k")
    if not np.isfinite(trace.topk_weights).all():
        raise MoeRtError(f"{where}: topk_weights has NaN or infinite values")
    if (trace.positions < 0).any():
        raise MoeRtError(f"{where}: positions has negative values")
    if (np.diff(trace.steps) < 0).any():
        first = int(np.argmax(np.diff(trace.steps) < 0)) + 1
        raise MoeRtError(f"{where}: steps must be non-decreasing (row {first} goes back "
                         f"from {int(trace.steps[first - 1])} to {int(trace.steps[first])})")


def save_trace(path: str | os.PathLike, trace: Trace) -> None:
    """Validate, then write `path` (uncompressed .npz; numpy adds .npz if missing)."""
    validate_trace(trace, f"trace {os.fspath(path)}")
    arrays: dict[str, np.ndarray] = {
        "topk_ids": trace.topk_ids, "topk_weights": trace.topk_weights,
        "seq_ids": trace.seq_ids, "positions": trace.positions, "steps": trace.steps,
        "meta": np.array(trace.meta.to_json()),
    }
    for name in OPTIONAL_ARRAYS:
        if getattr(trace, name) is not None:
            arrays[name] = getattr(trace, name)
    np.savez(path, **arrays)


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace; any problem raises MoeRtError with a one-line message."""
    where = f"trace {os.fspath(path)}"
    if not os.path.isfile(path):
        raise MoeRtError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        # ValueError also covers object arrays, which would need pickle: never load those.
        raise MoeRtError(f"{where}: not a readable .npz file ({str(e).splitlines()[0]})") from None
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise MoeRtError(f"{where}: missing array(s) {', '.join(missing)}")
    meta = arrays["meta"]
    if meta.dtype.kind not in "US" or meta.size != 1:
        raise MoeRtError(f"{where}: meta must be a single JSON string, got dtype {meta.dtype} "
                         f"with shape {tuple(meta.shape)}")
    text = meta.reshape(()).item()
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    trace = Trace(arrays["topk_ids"], arrays["topk_weights"], arrays["seq_ids"],
                  arrays["positions"], arrays["steps"], TraceMeta.from_json(text, where),
                  arrays.get("hidden"), arrays.get("token_ids"), arrays.get("layer_output"))
    validate_trace(trace, where)
    return trace


def step_bounds(steps: np.ndarray) -> list[tuple[int, int, int]]:
    """(step, start, stop) per run of equal steps. steps: [N] non-decreasing, so runs are the batches."""
    if len(steps) == 0:
        return []
    cuts = np.flatnonzero(np.diff(steps) != 0) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(steps)]])
    return [(int(steps[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def iter_steps(trace: Trace) -> Iterator[tuple[int, slice]]:
    """Yield (step, rows) per forward batch, in execution order; `trace.take(rows)` gives the batch."""
    for step, start, stop in step_bounds(trace.steps):
        yield step, slice(start, stop)


def select_seqs(trace: Trace, seq_ids: np.ndarray | list[int]) -> Trace:
    """Rows whose sequence is in `seq_ids`, execution order kept."""
    rows = np.flatnonzero(np.isin(trace.seq_ids, np.asarray(seq_ids, dtype=np.int64)))
    return trace.take(rows)


def split_by_seq(trace: Trace, held_out: float = 0.2, seed: int = 0) -> tuple[Trace, Trace]:
    """(train, held-out) with whole sequences on each side, so held-out tokens are never seen in fit.

    ceil(held_out * S) of the S sequences, chosen by `seed`, go to held-out; each side gets >= 1.
    """
    seqs = np.unique(trace.seq_ids)
    if len(seqs) < 2:
        raise MoeRtError(f"cannot split a trace with {len(seqs)} sequence(s) into train and held-out")
    if not 0.0 < held_out < 1.0:
        raise MoeRtError(f"held-out fraction must be in (0, 1), got {held_out}")
    n_held = min(max(1, math.ceil(held_out * len(seqs))), len(seqs) - 1)
    order = np.random.default_rng(seed).permutation(len(seqs))
    held = seqs[np.sort(order[:n_held])]
    train = seqs[np.sort(order[n_held:])]
    return select_seqs(trace, train), select_seqs(trace, held)
