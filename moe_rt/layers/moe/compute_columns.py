"""The float32 CPU expert loop with activations kept as columns: [features, rows] instead of
[rows, features].

Why: layers.linear computes a projection of a few rows as (w·xᵀ)ᵀ, the form in which BLAS streams
a row-major weight fast, and then copies the transposed product back into rows. Between the two
projections of an expert nothing needs rows: w13·xᵀ is [2I, r] and its gate and up halves are
contiguous row blocks; silu(gate)·up is written out as rows [r, I] (the one layout in which BLAS
streams w2 fast when it is the right operand's transpose), and w2 multiplies it into [D, r]. So
the loop never copies a product back into rows until the token sum, which gathers each pair's
column once. Evenly spaced slots of a stack (any two are) are one strided batch, so several
experts go through one bmm per projection (_spaced). Every view is one `as_strided` (slots of the
stack, a group's columns, the gate and up halves) rather than indexing, which dispatches two ops
per view: this path runs per layer per decode step, and at small sizes a step's time is mostly
operator dispatch (docs/benchmarks.md, "Decode overhead").

A one-row group would reach BLAS as a matrix-vector product, its slow kernel for this layout
(see layers/linear.py), so it is multiplied as two columns: its own and a padding column, whose
result is never read. A column's result does not depend on the other columns of the product.
Groups of more than linear.ROW_MAJOR_MAX_ROWS rows take F.linear's x·wᵀ, as linear would.

Arithmetic: the same products as the row loops of compute.py, the weighted rows added per token
in slot order into a float32 output, as compute._combine does; BLAS may order a dot product's
additions differently for the column layout of the second projection, so results agree with the
row loops to float32 rounding.

Shape legend: T tokens, K choices, P (token, choice) pairs that have a slot, D hidden,
I intermediate, S slots.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moe_rt.layers.linear import ROW_MAJOR_MAX_ROWS

# Groups of at most this many rows share batched matmuls (see used_slots_columns): up to here a
# product's time is the weight's streaming, so a padded column is nearly free; above it columns
# cost compute.
PAIR_MAX_ROWS = 4


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
    zc = z.as_strided((I, n), (1, I))
    torch.mul(F.silu(h.as_strided((I, n), (n, 1))), h.as_strided((I, n), (n, 1), I * n), out=zc)
    return torch.mm(_slot(w2, s), zc) if out is None else torch.mm(_slot(w2, s), zc, out=out)


def supports(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Dense stacks whose slots are contiguous (what _slot views)."""
    return (isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor)
            and w13.stride()[1:] == (w13.shape[2], 1) and w2.stride()[1:] == (w2.shape[2], 1))


def _spaced(w: torch.Tensor, a: int, d: int, m: int) -> torch.Tensor:
    """Slots a, a + d, ..., a + (m - 1) d (d > 0) of a stack [S, N, K] with contiguous slots as one
    batch [m, N, K], in one dispatched op."""
    n, k = w.shape[1], w.shape[2]
    return w.as_strided((m, n, k), (d * w.stride(0), k, 1), w.storage_offset() + a * w.stride(0))


def _block_columns(xc: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, a: int, d: int, I: int,
                   out: torch.Tensor) -> None:
    """Columns xc [m, D, n] through slots a, a + d, ... (one strided batch, _spaced): the
    _expert_columns of m experts in one bmm per projection, written into `out` [m, D, n]
    (contiguous: bmm writes a strided batch through a per-batch loop)."""
    m, _, n = xc.shape
    h = torch.bmm(_spaced(w13, a, d, m), xc)  # [m, 2I, n]
    z = torch.empty((m, n, I), dtype=h.dtype, device=h.device)  # silu(gate)·up as rows, read by w2 transposed
    zc = z.as_strided((m, I, n), (n * I, 1, I))
    torch.mul(F.silu(h.as_strided((m, I, n), (2 * I * n, n, 1))), h.as_strided((m, I, n), (2 * I * n, n, 1), I * n),
              out=zc)
    torch.bmm(_spaced(w2, a, d, m), zc, out=out)


def one_token_columns(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor) -> torch.Tensor:
    """T == 1: the token's row, doubled into two columns once for every expert, through the chosen
    slots taken two at a time in slot order, each pair as one batched matmul per projection; the
    products' first columns weighted and summed in slot order -> [1, D].

    Why pairs: two slots of a stack are one strided batch, so a pair costs the dispatched ops of
    one expert, and bmm gives each of two threads its own expert where mm split one small product
    between them: a mixtral-56m layer's two experts 185-217 -> 146-161 us (two threads, weights
    streamed from memory), 43 -> 25 ops (34 when the choices are not in slot order and the
    weights are reordered). An odd last slot goes alone."""
    D, I = hidden.shape[1], w2.shape[2]
    ids = topk_ids.tolist()[0]  # (indexing the row first would dispatch two more ops)
    chosen = sorted((s, k) for k, s in enumerate(ids) if s >= 0)
    n = len(chosen)
    if n == 0:
        return torch.zeros_like(hidden)
    xc = torch.cat((hidden, hidden))  # [2, D]: its transposed view is the two equal columns
    y = torch.empty((n, D, 2), dtype=hidden.dtype, device=hidden.device)  # slot j's [D, 2] product at y[j]
    for j in range(0, n - 1, 2):
        (a, _), (b, _) = chosen[j], chosen[j + 1]
        _block_columns(xc.as_strided((2, D, 2), (0, 1, D)), w13, w2, a, b - a, I,
                       out=y.as_strided((2, D, 2), (2 * D, 2, 1), j * 2 * D))
    if n % 2:
        _expert_columns(xc.as_strided((D, 2), (1, D)), w13, w2, chosen[-1][0], I,
                        out=y.as_strided((D, 2), (2, 1), (n - 1) * 2 * D))
    ks = [k for _, k in chosen]
    if ks == list(range(n)):  # the weights, as a column in slot order
        w = topk_weights.as_strided((n, 1), (topk_weights.stride(1), 1), topk_weights.storage_offset())
    else:
        w = torch.index_select(topk_weights.reshape(-1), 0, torch.from_numpy(np.array(ks))).view(n, 1)
    # column 0 of each product, weighted, summed in slot order (a product with y's rows would
    # first copy them: their stride is 2)
    return (y.as_strided((n, D), (2 * D, 2)) * w).sum(0, keepdim=True)


def used_slots_columns(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor:
    """The (token, choice) pairs grouped by slot (-1 pairs dropped), each used slot's rows through
    its expert as columns; runs of consecutive groups of few rows whose slots are evenly spaced
    (any two are; at batch 16 most used slots are neighbours), an even number of them, as one
    batched matmul per projection; products weighted and added into the tokens' rows -> [T, D].

    Layout: the groups' rows sit in x [R, D] in regions of n rows: the m groups of a block all get
    n = their largest row count (at least 2), so the block reads one strided batch of m [D, n]
    column blocks and writes one contiguous [m, D, n] block of y; a group with fewer rows reads
    some other token's row as padding, whose column is computed and never read. A one-row group
    thereby always has a second column (one column would take BLAS's slow matrix-vector kernel).
    Groups of more than PAIR_MAX_ROWS rows go alone (padding would cost real work there), those
    over linear.ROW_MAJOR_MAX_ROWS as F.linear's x·wᵀ, as linear would. The routing metadata is
    read into numpy (a CPU tensor's memory is the host's): it costs no dispatched op per group.
    Mixtral-56m shapes, 16 tokens: 273 ops per layer as one expert at a time, 164 in pairs, 100 in
    runs; 1422-1581 -> 1290 -> 1143 us (two threads, random routing, weights from memory)."""
    T, K = topk_ids.shape
    D, I = hidden.shape[1], w2.shape[2]
    flat = topk_ids.numpy().reshape(-1)
    order = np.argsort(flat, kind="stable")
    order = order[flat[order] >= 0]  # pairs with a slot, in slot order
    if not len(order):
        return torch.zeros_like(hidden)
    slots = flat[order]
    cuts = (np.flatnonzero(slots[1:] != slots[:-1]) + 1).tolist()
    groups = [(int(slots[b]), b, e - b) for b, e in zip([0] + cuts, cuts + [len(slots)])]  # (slot, first, rows)
    # blocks: (first group, groups in it (m), n, first row of x / column block of y)
    plan, R, g = [], 0, 0
    while g < len(groups):
        m = 1  # groups in this block: evenly spaced slots (any two are), each of few rows
        if groups[g][2] <= PAIR_MAX_ROWS:
            while (g + m < len(groups) and groups[g + m][2] <= PAIR_MAX_ROWS
                   and (m == 1 or groups[g + m][0] - groups[g + m - 1][0] == groups[g + 1][0] - groups[g][0])):
                m += 1
            m -= m % 2 if m > 2 else 0  # an even batch: bmm shares it out between two threads evenly
        n = max(2, *(r for _, _, r in groups[g : g + m]))
        plan.append((g, m, n, R))
        R, g = R + m * n, g + m
    tokens = order // K
    src = np.empty(R, dtype=np.int64)  # x's row i is token src[i]'s
    col = np.empty(len(order), dtype=np.int64)  # where (token, choice) pair p's output starts in y
    step = np.empty(len(order), dtype=np.int64)  # and the stride of its D values there
    for g0, m, n, at in plan:
        for j, (_, b, r) in enumerate(groups[g0 : g0 + m]):
            o = at + j * n
            src[o : o + r] = tokens[b : b + r]
            src[o + r : o + n] = tokens[b]  # padding: a row that is computed and never read
            if r > ROW_MAJOR_MAX_ROWS:  # F.linear's rows: [r, D] row-major
                col[b : b + r], step[b : b + r] = o * D + np.arange(r) * D, 1
            else:  # a [D, n] column block
                col[b : b + r], step[b : b + r] = o * D + np.arange(r), n
    x = torch.index_select(hidden, 0, torch.from_numpy(src))  # [R, D]
    y = torch.empty(R * D, dtype=hidden.dtype, device=hidden.device)  # block by block: [m, D, n], [D, n] or [r, D]
    for g0, m, n, at in plan:
        if m > 1:
            a, d = groups[g0][0], groups[g0 + 1][0] - groups[g0][0]
            _block_columns(x.as_strided((m, D, n), (n * D, 1, D), at * D), w13, w2, a, d, I,
                           out=y.as_strided((m, D, n), (D * n, n, 1), at * D))
            continue
        s, r = groups[g0][0], groups[g0][2]
        if r > ROW_MAJOR_MAX_ROWS:  # many rows: linear's rule, F.linear's x·wᵀ
            h = F.linear(x.as_strided((r, D), (D, 1), at * D), _slot(w13, s))
            torch.mm(F.silu(h[:, :I]) * h[:, I:], _slot(w2, s).t(), out=y.as_strided((r, D), (D, 1), at * D))
        else:
            _expert_columns(x.as_strided((D, n), (1, D), at * D), w13, w2, s, I,
                            out=y.as_strided((D, n), (n, 1), at * D))
    # pair p's D outputs, gathered into a row
    rows = torch.index_select(y, 0, torch.from_numpy(col[:, None] + step[:, None] * np.arange(D)).view(-1))
    w = torch.index_select(topk_weights.reshape(-1), 0, torch.from_numpy(order))
    out = torch.zeros_like(hidden)
    return out.index_add_(0, torch.from_numpy(tokens), rows.view(-1, D) * w[:, None])
