"""The float32 CPU expert loop with activations kept as columns: [features, rows] instead of
[rows, features].

Why: layers.linear computes a projection of a few rows as (w·xᵀ)ᵀ, the form in which BLAS streams
a row-major weight fast, and then copies the transposed product back into rows. Between the two
projections of an expert nothing needs rows: w13·xᵀ is [2I, r] and its gate and up halves are
contiguous row blocks; silu(gate)·up is written out as rows [r, I] (the one layout in which BLAS
streams w2 fast when it is the right operand's transpose), and w2 multiplies it into [D, r]. So
the loop never copies a product back into rows: the token sum adds column j into the output row
of its token (an index_add_ along the transposed output). Every view is one `as_strided` (a slot
of the stack, a group's columns, the gate and up halves) rather than indexing, which dispatches
two ops per view: this path runs per used expert per layer per decode step, and at small sizes a
step's time is mostly operator dispatch (docs/benchmarks.md, "Decode overhead").

A one-row group would reach BLAS as a matrix-vector product, its slow kernel for this layout
(see layers/linear.py), so it is multiplied as two columns: its own and a neighbour's, whose
result is dropped. A column's result does not depend on the other columns of the product.
Groups of more than linear.ROW_MAJOR_MAX_ROWS rows take F.linear's x·wᵀ, as linear would.

Arithmetic: the same products as the row loops of compute.py, the weighted rows added per token
in slot order into a float32 output, as compute._combine does; BLAS may order a dot product's
additions differently for the column layout of the second projection, so results agree with the
row loops to float32 rounding.

Shape legend: T tokens, K choices, P (token, choice) pairs that have a slot, D hidden,
I intermediate, S slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_rt.layers.linear import ROW_MAJOR_MAX_ROWS


def _slot(w: torch.Tensor, s: int) -> torch.Tensor:
    """w[s] for a stack [S, N, K] with contiguous slots, in one dispatched op."""
    n, k = w.shape[1], w.shape[2]
    return w.as_strided((n, k), (k, 1), w.storage_offset() + s * w.stride(0))


def _expert_columns(xc: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, s: int, I: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Columns xc [D, n] through expert slot s: w2·(silu(gate)·up) with [gate; up] = w13·xc -> [D, n]
    (written into `out`, a [D, n] view with unit column stride, when given)."""
    n = xc.shape[1]
    h = torch.mm(_slot(w13, s), xc)  # [2I, n] contiguous: gate rows, then up rows
    # silu(gate)·up is written as rows [n, I] and handed to w2 as their transposed view: BLAS
    # streams w2 3-4x slower when the right operand is a plain [I, n] (measured at n = 2-4).
    z = torch.empty((n, I), dtype=h.dtype, device=h.device)
    torch.mul(F.silu(h.as_strided((I, n), (n, 1))), h.as_strided((I, n), (n, 1), I * n), out=z.as_strided((I, n), (1, I)))
    zc = z.as_strided((I, n), (1, I))
    return torch.mm(_slot(w2, s), zc) if out is None else torch.mm(_slot(w2, s), zc, out=out)


def supports(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Dense stacks whose slots are contiguous (what _slot views)."""
    return (isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor)
            and w13.stride()[1:] == (w13.shape[2], 1) and w2.stride()[1:] == (w2.shape[2], 1))


def one_token_columns(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor) -> torch.Tensor:
    """T == 1: the token's row, doubled into two columns once for every expert, through each chosen
    slot in slot order; the weighted outputs of column 0 summed in that order -> [1, D]."""
    D, I = hidden.shape[1], w2.shape[2]
    xc = torch.cat((hidden, hidden)).as_strided((D, 2), (1, D))
    ids = topk_ids[0].tolist()
    w0, wk = topk_weights.storage_offset(), topk_weights.stride(1)
    out = None
    for s, k in sorted((s, k) for k, s in enumerate(ids) if s >= 0):
        y = _expert_columns(xc, w13, w2, s, I)  # [D, 2]
        # column 0 read as a row [1, D]; the product with the [1] weight is a contiguous row
        y = y.as_strided((1, D), (2 * D, 2)) * topk_weights.as_strided((1,), (1,), w0 + k * wk)
        out = y if out is None else out + y
    return torch.zeros_like(hidden) if out is None else out


def used_slots_columns(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor:
    """The pairs grouped by slot (-1 pairs dropped), each used slot's group through its expert as
    columns of one [D, P] product, which is weighted and added into the tokens' rows -> [T, D].

    The pairs' rows and the product have one spare column at the end, so a one-row group can always
    take its right neighbour as its second column: what it writes there is overwritten by the
    neighbour's own group, which comes later, or lands in the spare column, which is never read."""
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # -1 pairs first
    slots = flat[order].tolist()
    first = next((i for i, s in enumerate(slots) if s >= 0), len(slots))
    out = torch.zeros_like(hidden)
    if first == len(slots):
        return out
    order = order[first:]
    tokens = order // K
    slots = slots[first:]
    P, D, I = len(slots), hidden.shape[1], w2.shape[2]
    x = hidden.new_zeros(P + 1, D)  # [P + 1, D]: the pairs' rows in slot order, then the spare
    torch.index_select(hidden, 0, tokens, out=x.as_strided((P, D), (D, 1)))
    y = hidden.new_empty(D, P + 1)
    start = 0
    for end in range(1, P + 1):
        if end < P and slots[end] == slots[start]:
            continue
        s, r = slots[start], end - start
        if r > ROW_MAJOR_MAX_ROWS:  # many rows: linear's rule, F.linear's x·wᵀ
            h = F.linear(x[start:end], _slot(w13, s))
            y[:, start:end] = F.linear(F.silu(h[:, :I]) * h[:, I:], _slot(w2, s)).t()
        else:
            n = max(r, 2)
            _expert_columns(x.as_strided((D, n), (1, D), start * D), w13, w2, s, I,
                            out=y.as_strided((D, n), (P + 1, 1), start))
        start = end
    out.t().index_add_(1, tokens, y.as_strided((D, P), (P + 1, 1)) * topk_weights.reshape(-1)[order])
    return out
