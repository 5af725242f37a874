"""Which running sequences decode together in a step: first come first served, or expert-aware.

With experts offloaded a decode step costs, layer by layer, the union of the experts its tokens
route to (each distinct expert is loaded once for the batch). `expert_aware` (Read-ME's batching
by pre-computed routes, ExpertFlow's regrouping) steps a subset of the running sequences whose
forecast experts overlap or are resident in the expert cache; the others wait. How many: by
default the number that decodes the most tokens per second, |S| / (fixed + token x |S| + read x
expected loads of S), with the step's fixed and per-token time and an expert's read time measured
while serving (step_costs.py): where loads are cheap next to a step every sequence is taken
(fcfs), and only where loads dominate does the batch shrink, and only while epochs of shrinking
measurably decode faster than epochs of whole batches (step_costs.ShrinkGate). With
`expert_aware_batch` set, that many (the fixed-size rule trace replay also uses). A sequence's
route is forecast from what the scheduler has seen of routing
(`RouteRecord`, fed by the model's RoutingHub: the core needs no expert cache to know it): the
experts its next input token usually takes (`TokenRouteTable`), else those its previous token took.
What the fast tier holds and how long loads take, the policy asks the model's expert store through
the narrow CacheProbe protocol (the core never imports the cache that implements it).

Invariants:
  * no starvation: a sequence left out `max_skips` steps in a row is in the next step's batch
    (all such sequences are, even beyond the batch size);
  * only timing moves: which step a token is computed in changes, never what it attends to or
    which experts it uses, so greedy output is that of fcfs (tests/moe_rt/test_expert_aware.py).

Shape legend: L MoE layers, T rows of a forward, K experts per token.
"""
from __future__ import annotations

import math
import time
from typing import Protocol, Sequence as Seq, runtime_checkable

import torch

from moe_rt.config import EngineConfig
from moe_rt.layers.moe.block import MoEContext
from moe_rt.layers.moe.events import RouterEvent
from moe_rt.models.spec import ModelSpec

from .expert_groups import Route, StepCosts, fastest_group, grow_group
from .sequence import Sequence
from .step_costs import ShrinkGate, StepCostModel

TAKE_ALL = StepCosts(1.0, 0.0, 0.0)  # nothing measured yet: loads cost nothing, every sequence steps


@runtime_checkable
class CacheProbe(Protocol):
    """What expert_aware asks of an expert store that offloads (expert_cache.ExpertCache)."""

    def resident_experts(self, layer: int) -> frozenset[int]:
        """Experts of MoE layer `layer` in the fast tier now (a step using them loads nothing)."""

    def load_clock(self) -> tuple[int, float]:
        """(expert loads, seconds the model waited on them), both cumulative since start."""


class DecodePolicy(Protocol):
    def select(self, candidates: list[Sequence]) -> list[Sequence]:
        """The candidates (running, in running order) to decode this step, in that order."""

    def forget(self, seq: Sequence) -> None:
        """`seq` left the running set for good (finished or aborted)."""

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class FCFS:
    """Every running sequence decodes every step (continuous batching as it always was)."""

    def select(self, candidates: list[Sequence]) -> list[Sequence]:
        return candidates

    def forget(self, seq: Sequence) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


MAX_TABLE_ENTRIES = 64 * 2**20  # V x L x E counts above this: the token table is off (int32, 256 MiB)


class TokenRouteTable:
    """How often each input token id was routed to each expert, per MoE layer, learned from the
    tokens served so far (Read-ME's routes computed ahead from the token alone). In decode the
    next input token is known before its step runs (it was just sampled), so its usual experts
    are a forecast of its route: on the demo model they overlap the true route about three
    times better than the sequence's previous route does (docs/scheduling.md).

    counts [L, V, E] int32. Off (predict gives None) when V x L x E exceeds MAX_TABLE_ENTRIES."""

    def __init__(self, vocab_size: int, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_experts, self.top_k = num_experts, top_k
        on = vocab_size * num_layers * num_experts <= MAX_TABLE_ENTRIES
        self.counts = torch.zeros(num_layers, vocab_size, num_experts, dtype=torch.int32) if on else None

    def observe(self, layer: int, tokens: torch.Tensor, ids: torch.Tensor) -> None:
        """tokens [T] int64 input token per row; ids [T, K] int64 experts (-1 = dropped)."""
        if self.counts is None:
            return
        keep = ids >= 0
        flat = (tokens[:, None] * self.num_experts + ids)[keep]
        self.counts[layer].view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def predict(self, token: int) -> list[frozenset[int]] | None:
        """[L] the token's top_k most frequent experts per layer; None if it was never seen."""
        return self.predict_many([token])[0]

    def predict_many(self, tokens: list[int]) -> list[list[frozenset[int]] | None]:
        """predict for each of `tokens`, in one gather and one topk (a step asks for every
        running sequence at once)."""
        if self.counts is None:
            return [None] * len(tokens)
        V = self.counts.shape[1]
        ok = [0 <= t < V for t in tokens]
        rows = self.counts[:, torch.tensor([t if k else 0 for t, k in zip(tokens, ok)], dtype=torch.int64)]  # [L, N, E]
        seen = (rows[0].sum(-1) > 0).tolist()
        top = rows.topk(self.top_k, dim=-1)
        ids, counts = top.indices.transpose(0, 1).tolist(), top.values.transpose(0, 1).tolist()  # [N, L, K]
        return [[frozenset(e for e, n in zip(i, v) if n > 0) for i, v in zip(ids[j], counts[j])]
                if ok[j] and seen[j] else None for j in range(len(tokens))]


class RouteRecord:
    """What the scheduler knows of routing: per sequence, the experts its most recent token used
    at each MoE layer; per layer, the experts the most recent forward used (the warm set: what an
    expert cache most likely holds); and the token table. Fed one forward's routing per layer, by
    the engine's RoutingHub or by trace replay, in the same way."""

    def __init__(self, num_layers: int, table: TokenRouteTable | None = None) -> None:
        self.num_layers, self.table = num_layers, table
        self.routes: dict[int, list[frozenset[int]]] = {}  # seq_id -> [L]
        self.warm: list[frozenset[int]] = [frozenset() for _ in range(num_layers)]

    def observe(self, layer: int, seq_ids: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor) -> None:
        """One forward at one MoE layer: seq_ids [T], tokens [T] (input tokens), ids [T, K], CPU int64.
        Rows of one sequence are contiguous (a prompt, or one decode token): its last row counts."""
        last = torch.ones(len(seq_ids), dtype=torch.bool)
        last[:-1] = seq_ids[1:] != seq_ids[:-1]
        for sid, row in zip(seq_ids[last].tolist(), ids[last].tolist()):
            route = self.routes.setdefault(sid, [frozenset()] * self.num_layers)
            route[layer] = frozenset(e for e in row if e >= 0)
        self.warm[layer] = frozenset(e for e in ids.unique().tolist() if e >= 0)
        if self.table is not None:
            self.table.observe(layer, tokens, ids)

    def predict(self, seq_id: int, next_token: int) -> list[frozenset[int]] | None:
        """The forecast route of `seq_id`'s next token: the token table's, else its last route."""
        return self.predict_many([(seq_id, next_token)])[0]

    def predict_many(self, pending: list[tuple[int, int]]) -> list[list[frozenset[int]] | None]:
        """predict for each (seq_id, next_token) of `pending`."""
        table = self.table.predict_many([t for _, t in pending]) if self.table is not None else [None] * len(pending)
        return [r if r is not None else self.routes.get(sid) for r, (sid, _) in zip(table, pending)]

    def forget(self, seq_id: int) -> None:
        self.routes.pop(seq_id, None)


def choose_batch(candidates: Seq[int], routes: dict[int, Route], skips: dict[int, int], size: int | None,
                 max_skips: int, num_layers: int, warm: Seq[frozenset[int]] | None = None, *,
                 costs: StepCosts | None = None, resident: Seq[frozenset[int]] | None = None) -> list[int]:
    """Pure: which of `candidates` (ids, oldest first) decode this step. Those skipped
    `max_skips` times in a row come first (all of them); the batch is then grown by least
    marginal cost over predicted experts: to `size` (expert_groups.grow_group, `warm` experts
    cheaper), or, given `costs`, to the size that decodes the most tokens per second
    (expert_groups.fastest_group, `resident` experts free). Returned in candidate order."""
    forced = [i for i in candidates if skips.get(i, 0) >= max_skips]
    if costs is not None:
        group = set(fastest_group(forced, candidates, routes, num_layers, costs, resident))
    else:
        group = set(grow_group(forced, candidates, routes, size, num_layers, warm))
    return [i for i in candidates if i in group]


class BatchChooser:
    """choose_batch plus the skip counts it needs: the one decision shared by the engine
    (ExpertAware) and trace replay (expert_cache/schedule_replay.py). `batch_size` None means the
    fastest size under the `costs` given to choose, or, given none (replay has no clock), half
    of the candidates, rounded up."""

    def __init__(self, num_layers: int, batch_size: int | None, max_skips: int) -> None:
        self.num_layers, self.batch_size, self.max_skips = num_layers, batch_size, max_skips
        self.skips: dict[int, int] = {}  # id -> steps skipped in a row
        self.steps = self.partial_steps = self.skipped = self.max_skips_seen = 0

    def choose(self, ids: list[int], routes: dict[int, Route], warm: Seq[frozenset[int]] | None,
               costs: StepCosts | None = None, resident: Seq[frozenset[int]] | None = None) -> list[int]:
        if not ids:
            return []
        if self.batch_size is not None:
            costs = None
        size = self.batch_size or math.ceil(len(ids) / 2)
        chosen = choose_batch(ids, routes, self.skips, size, self.max_skips, self.num_layers, warm,
                              costs=costs, resident=resident)
        picked = set(chosen)
        self.steps += 1
        self.partial_steps += len(chosen) < len(ids)
        for i in ids:
            if i in picked:
                self.skips[i] = 0
            else:
                self.skips[i] = self.skips.get(i, 0) + 1
                self.skipped += 1
                self.max_skips_seen = max(self.max_skips_seen, self.skips[i])
        return chosen

    def forget(self, i: int) -> None:
        self.skips.pop(i, None)

    def stats(self) -> dict:
        return {"decode_steps": self.steps, "partial_steps": self.partial_steps,
                "skipped_sequence_steps": self.skipped, "max_consecutive_skips": self.max_skips_seen}


class ExpertAware:
    """Steps the subset of the running sequences BatchChooser picks from their forecast routes.

    Timing: a step runs from one select to the next (the forward and postprocess between them,
    and this choice itself). It is a sample of StepCostModel and ShrinkGate only when its forward
    held exactly the decode rows chosen (no prefill mixed in), and the load seconds within it come
    from the store's CacheProbe; with no probe (every expert resident) loads cost nothing. The
    costs shape the batch only while the ShrinkGate finds that shrinking pays."""

    def __init__(self, ctx: MoEContext, record: RouteRecord, batch_size: int | None, max_skips: int) -> None:
        self.ctx, self.record = ctx, record
        self.chooser = BatchChooser(record.num_layers, batch_size, max_skips)
        self.costs = StepCostModel()
        self.gate = ShrinkGate()
        self._step: tuple[float, int, tuple[int, float]] | None = None  # (start, rows chosen, load clock)
        self._rows = 0  # rows of the last forward (its first MoE layer's)
        self._unsubscribe = ctx.hub.subscribe(self._on_event)

    def _on_event(self, event: RouterEvent) -> None:
        b = event.batch
        if b is not None:  # None: a scoring pass outside the engine's steps
            self.record.observe(event.moe_index, b.seq_ids, b.token_ids, event.topk_ids.detach().cpu())
            if event.moe_index == 0:
                self._rows = len(b.seq_ids)

    def _probe(self) -> CacheProbe | None:
        store = self.ctx.store
        return store if isinstance(store, CacheProbe) else None

    def select(self, candidates: list[Sequence]) -> list[Sequence]:
        now, probe = time.perf_counter(), self._probe()
        clock = probe.load_clock() if probe is not None else (0, 0.0)
        if self._step is not None and candidates:
            start, n, (loads, load_s) = self._step
            if self._rows == n:
                self.costs.add(n, now - start, clock[0] - loads, clock[1] - load_s)
                self.gate.add(n, now - start)
        costs = (self.costs.estimate() if self.gate.shrink else None) or TAKE_ALL
        routes, resident = {}, None
        if candidates and (self.chooser.batch_size is not None or costs is not TAKE_ALL):  # else all go
            forecast = self.record.predict_many([(s.seq_id, s.token_ids[-1]) for s in candidates])
            routes = {s.seq_id: r for s, r in zip(candidates, forecast) if r is not None}
            if probe is not None:
                resident = [probe.resident_experts(l) for l in range(self.record.num_layers)]
        chosen = set(self.chooser.choose([s.seq_id for s in candidates], routes, self.record.warm, costs, resident))
        self._step, self._rows = ((now, len(chosen), clock) if chosen else None), 0
        return [s for s in candidates if s.seq_id in chosen]

    def forget(self, seq: Sequence) -> None:
        self.chooser.forget(seq.seq_id)
        self.record.forget(seq.seq_id)

    def stats(self) -> dict:
        c = self.costs.estimate()
        measured = {} if c is None else {"step_fixed_ms": 1e3 * c.fixed_s, "step_token_ms": 1e3 * c.token_s,
                                         "expert_read_ms": 1e3 * c.read_s}
        return {**self.chooser.stats(), **measured, **self.gate.stats()}

    def close(self) -> None:
        self._unsubscribe()


def make_decode_policy(cfg: EngineConfig, ctx: MoEContext, spec: ModelSpec) -> DecodePolicy:
    """The policy `cfg.scheduler_policy` names, listening to the model's routing (ctx.hub) and
    asking its expert store (ctx.store, looked up each step: the cache is installed later) where
    it needs them."""
    if cfg.scheduler_policy == "fcfs":
        return FCFS()
    L = len(spec.moe_layer_ids)
    record = RouteRecord(L, TokenRouteTable(spec.vocab_size, L, spec.num_experts, spec.top_k))
    return ExpertAware(ctx, record, cfg.expert_aware_batch, cfg.expert_aware_max_skips)
