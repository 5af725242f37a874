"""Regroup a recorded trace's rows into the steps a scheduling policy would have run.

A trace fixes which sequences shared each forward step. Routing does not depend on that (a
token's experts depend only on its own sequence), so the same rows can be replayed in the order
another scheduler would have produced, and the cache replay (simulator.simulate) then measures
what the schedule saves. The step model is the engine's (moe_rt/engine/scheduler.py):

- Up to `concurrency` sequences run at once, admitted in the trace's order of first appearance;
  a sequence's first step in the trace (its prompt) is its prefill, and it joins the step after
  it is admitted, together with the decodes of the running sequences (one forward).
- Each later row of a sequence is one decode token, in position order. Every step the policy
  chooses which running, prefilled sequences decode: `fcfs` takes the `step_size` oldest;
  `expert_aware` makes the engine's own decision (moe_rt.engine.decode_policy: a RouteRecord fed
  the replayed rows, forecasts from the token table, else the previous row; BatchChooser).
- A sequence whose rows are used up finishes and frees its place for the next one.

Preemption and KV limits are not modelled (the trace does not record them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import torch

from moe_rt.engine.decode_policy import BatchChooser, RouteRecord, TokenRouteTable
from moe_rt.errors import MoeRtError
from router_predict.trace import Trace

SCHEDULES = ("fcfs", "expert_aware")


@dataclass(frozen=True)
class ScheduledTrace:
    trace: Trace  # the same rows in the new order, `steps` renumbered 0..S-1
    decode_union: float  # mean distinct experts per MoE layer over the steps that decode
    decode_steps: int
    decode_tokens: int
    max_consecutive_skips: int


def schedule_trace(trace: Trace, policy: str, concurrency: int, step_size: int | None = None,
                   max_skips: int = 3) -> ScheduledTrace:
    """`trace`'s rows regrouped into the steps `policy` takes with `concurrency` running
    sequences and at most `step_size` decoding per step (default: all running under fcfs, half
    of them rounded up under expert_aware)."""
    if policy not in SCHEDULES:
        raise MoeRtError(f"unknown schedule {policy!r}; choose from {', '.join(SCHEDULES)}")
    if concurrency < 1 or (step_size is not None and step_size < 1) or max_skips < 1:
        raise MoeRtError("concurrency, step size and max skips must be >= 1")
    L = trace.num_layers
    # Per sequence (first-appearance order): its prefill rows, then its decode rows by position.
    order = list(dict.fromkeys(trace.seq_ids.tolist()))
    prefill: dict[int, list[int]] = {}
    decode: dict[int, list[int]] = {}
    for sid in order:
        rows = np.flatnonzero(trace.seq_ids == sid)
        first = trace.steps[rows[0]]
        prefill[sid] = rows[trace.steps[rows] == first].tolist()
        later = rows[trace.steps[rows] != first]
        decode[sid] = later[np.argsort(trace.positions[later], kind="stable")].tolist()
    chooser = BatchChooser(L, step_size, max_skips) if policy == "expert_aware" else None
    table = None
    if trace.token_ids is not None:
        table = TokenRouteTable(int(trace.token_ids.max()) + 1, L, trace.num_experts, trace.top_k)
    record = RouteRecord(L, table)
    waiting, running = list(order), []
    prefilled: set[int] = set()
    new_rows: list[int] = []
    new_steps: list[int] = []
    union_total = decode_steps = decode_tokens = step = 0
    while waiting or running:
        ready = [s for s in running if s in prefilled]
        if chooser is None:
            chosen = ready[: step_size or len(ready)]
        else:  # the engine's decision (ExpertAware.select) on the same record
            routes = {s: r for s in ready if (r := record.predict(s, _next_token(trace, decode[s][0]))) is not None}
            chosen = chooser.choose(ready, routes, record.warm)
        admitted = []
        while waiting and len(running) < concurrency:
            admitted.append(waiting.pop(0))
            running.append(admitted[-1])
        stepped = [decode[sid].pop(0) for sid in chosen]  # one decode row each
        rows = [r for sid in admitted for r in prefill[sid]] + stepped
        _observe(record, trace, rows)
        prefilled.update(admitted)
        if stepped:
            decode_steps += 1
            decode_tokens += len(stepped)
            union_total += sum(len(u) for u in _union(trace, stepped))
        for sid in [s for s in running if s in prefilled and not decode[s]]:
            running.remove(sid)
            record.forget(sid)
            if chooser is not None:
                chooser.forget(sid)
        new_steps.extend([step] * len(rows))
        new_rows.extend(rows)
        step += 1
    out = trace.take(np.asarray(new_rows, dtype=np.int64))
    out.steps = np.asarray(new_steps, dtype=np.int64)
    return ScheduledTrace(out, union_total / (decode_steps * L) if decode_steps else 0.0, decode_steps,
                          decode_tokens, chooser.max_skips_seen if chooser is not None else 0)


def _next_token(trace: Trace, row: int) -> int:
    """The input token of a decode row: known to the engine when it schedules the row's step."""
    return int(trace.token_ids[row]) if trace.token_ids is not None else -1


def _observe(record: RouteRecord, trace: Trace, rows: list[int]) -> None:
    """Feed one step's rows to the record, layer by layer, as the engine's router events do."""
    idx = np.asarray(rows, dtype=np.int64)
    seq_ids = torch.from_numpy(trace.seq_ids[idx])
    tokens = torch.from_numpy(trace.token_ids[idx]) if trace.token_ids is not None else torch.zeros_like(seq_ids)
    ids = torch.from_numpy(trace.topk_ids[idx].astype(np.int64))  # [T, L, K]
    for l in range(trace.num_layers):
        record.observe(l, seq_ids, tokens, ids[:, l])


def _union(trace: Trace, rows: list[int]) -> list[frozenset[int]]:
    """[L] distinct experts `rows` use per MoE layer (-1, a dropped choice, is none)."""
    ids = trace.topk_ids[rows]
    return [frozenset(int(e) for e in np.unique(ids[:, l]) if e >= 0) for l in range(trace.num_layers)]


