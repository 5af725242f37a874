"""The in-engine expert cache: an ExpertStore whose experts live in a bounded fast tier.

`expert_cache.install.install_expert_cache(model, reader, cfg, device=, dtype=)` builds an
ExpertCache and makes it the model's store. The cache owns the fast tier (slot buffers on the
compute device, in the compute dtype; on a CPU-only machine the "fast tier" is a RAM budget), the
CacheState (the only record of which expert holds which slot: the slot map handed to the kernel
is read from it), the slow tier (slow_tier.py) and the transfer engine (transfer.py). It is the
executor of the pure parts: the planners (planning.py, shared with the replay simulator) decide
what to load, prefetch and evict, CacheState applies their plans, and this class moves bytes.

Per MoE layer, `prepare(l, topk_ids)`:
  1. reads the routed ids to the host (the one host read per layer on CUDA: device_io.py) and
     folds the device timings that have completed (device_timing.py; queries only);
  2. completes landed prefetches; cancels queued prefetches (still in the host queue, not on the
     device: copy_queue.py) for layer l that l does not use (proven wrong) and for other layers
     that the forecast in force no longer names (withdrawn); counts submitted ones of l as
     proven wrong (wasted if evicted unused);
  3. marks l's experts needed (never evicted while needed or in flight), and waits for the
     copies of l's experts that a prefetch is still landing;
  4. with cpu_compute_on_miss, picks the misses that run on the host where their weights are
     (cost_model.choose_host_experts; they stay unmapped, LayerExperts.host_compute);
  5. cancels queued prefetches whose slots the misses need (planning.prefetches_to_reclaim), then
     plans the visit (planning.plan_demand: each other miss takes a free slot or the policy's
     victim, or is streamed through staging when every slot of the pool is pinned, needed or in
     flight), applies it to CacheState and loads the misses on this thread (stall counted);
  6. issues prefetches for layers l+1..l+d from the latest forecast (planning.plan_prefetch;
     they overlap l's compute);
  7. returns LayerExperts(slot buffers, slot_of [E] from CacheState.slot_map, sent to the device
     without a host wait).
All CacheState changes happen on the model's thread; the transfer worker only writes bytes.

Timing (lookahead auto, the cost rule, stall_s): on the CPU the host clock, as the work is done
when a call returns. On CUDA a copy or kernel only enqueues, so copy times, layer times and
stalls are elapsed times of events on the streams (device_timing.EventTimer), folded in when
they have completed: a copy's time is the time between events around it on its stream, a
layer's the compute stream's time from leaving one prepare to entering the next, a stall the
compute stream's time inside prepare (demand copies and waits for landing prefetches).

Shape legend: L MoE layers, E experts per layer, S slots per pool, I expert intermediate size,
D hidden size, T tokens, K experts per token.

Its parts, each owning its state: fast_tier.FastTier (the slot pools and the CacheState sized to
them), prefetch_tickets.PrefetchTickets (the prefetches in flight), prediction.Prediction (the
prefetcher, its forecaster and the measured switch) and host_compute.HostCompute (misses run on
the host).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch

from expert_cache.config import CacheConfig
from expert_cache.device_io import ids_on_host, used_experts
from expert_cache.device_timing import device_timer
from expert_cache.fast_tier import FastTier
from expert_cache.host_compute import HostCompute
from expert_cache.planning import plan_demand, plan_prefetch
from expert_cache.prediction import Prediction
from expert_cache.prefetch_switch import PrefetchSwitch
from expert_cache.prefetch_tickets import PrefetchTickets
from expert_cache.prefetcher import MovingAverage, Prefetcher
from expert_cache.records import ExpertFormat
from expert_cache.slow_tier import SlowTier
from expert_cache.transfer import Ticket, TransferEngine
from expert_cache.widths import WidthPlan
from moe_rt.layers.moe.events import Forecast
from moe_rt.layers.moe.store import ExpertStore, LayerExperts
from moe_rt.quant.plan import WIDTHS

log = logging.getLogger(__name__)


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    streamed: int = 0
    host_computed: int = 0  # misses run on the host instead of loaded (counted in misses too)
    stall_s: float = 0.0


class ExpertCache(ExpertStore):
    def __init__(self, spec, tier: SlowTier, cfg: CacheConfig, *, device: torch.device,
                 dtype: torch.dtype, fmt: ExpertFormat | None = None, plan: WidthPlan | None = None,
                 timer=None) -> None:
        """fmt: the record format of quantized experts (records.py), None for full precision. With
        one, each pool is a byte arena of records whose QuantizedStack views the model computes
        from, and `tier` reads records (records.py's tiers). plan: an expert bits plan (widths.py;
        not with fmt): one pool per (layer or global, width), each in its width's form, and each
        layer's experts handed to the model as MixedStacks of its pools. timer: how work on the
        device is timed (device_timing.device_timer(device) unless a test injects one)."""
        L, E = len(spec.moe_layer_ids), spec.num_experts
        D, I = spec.hidden_size, spec.moe.intermediate_size
        cfg.check_model(L, E)
        self.spec, self.cfg, self.tier = spec, cfg, tier
        self.device, self.dtype = torch.device(device), dtype
        self.num_layers, self.num_experts = L, E
        self.fmt, self.plan = fmt, plan
        self.fast = FastTier(spec, cfg, tier.name, device=self.device, dtype=dtype, fmt=fmt, plan=plan)
        self.state, self.capacity_slots = self.fast.state, self.fast.capacity_slots
        self._expert_bytes = self.fast.bytes_per_expert
        self.w13, self.w2, self.arenas = self.fast.w13, self.fast.w2, self.fast.arenas  # the pools
        self.timer = device_timer(self.device) if timer is None else timer
        self.transfer = TransferEngine(tier, self.device, max_queued=max(1, 2 * cfg.prefetch_queue),
                                       copies_in_flight=cfg.copies_in_flight, timer=self.timer)
        self.tickets = PrefetchTickets(self.state, self.transfer, self._time_copy)
        self.prediction = Prediction(L)
        self._tick = 0
        # (layer, timer mark leaving prepare, host clock then, prefetches issued, demand loads) of
        # the last prepare
        self._last: tuple[int, object, float, int, int] | None = None
        self.queued_reads = MovingAverage()  # transfer queue occupancy when prefetches are planned
        self.prefetches_declined = 0  # forecast keys not issued (cost rule, no slot)
        self.layers = [LayerCounters() for _ in range(L)]
        self._closed = False
        # Host compute of misses (cpu_compute_on_miss). The tier must hold whole layers in RAM.
        self.host = HostCompute(tier, cfg.cpu_compute_on_miss, num_experts=E,
                                expert_bytes=self._expert_bytes, flops_per_row=2 * 3 * D * I,
                                device=self.device)
        for key in cfg.pinned_keys():
            slot = self.state.pin(key, now=-1)
            self.transfer.load_now(key, *self.fast.slot(key, slot))

    # -- ExpertStore ------------------------------------------------------------------------------
    def expert_bytes(self) -> int:
        """Bytes of the fast tier (all slots)."""
        return self.fast.total_bytes()

    def prepare(self, moe_index: int, topk_ids: torch.Tensor) -> LayerExperts:
        timer = self.timer
        timer.poll()  # device timings that completed since (queries only, never a wait)
        mark = timer.mark()
        enter = time.perf_counter()
        self._tick += 1
        now, l = self._tick, moe_index
        pred, sw = self.prediction, self.prediction.switch
        if sw is not None and l == 0 and sw.step_boundary():
            pred.turn(sw.on)
        predicting = pred.predicting
        if self._last is not None and self._last[0] == l - 1:
            _, left, left_s, issued, loads = self._last
            if pred.prefetcher is not None:
                timer.measure(left, mark, partial(pred.prefetcher.record_layer, issued=issued, misses=loads))
            if sw is not None:  # the switch weighs host time: how much longer layers take with prediction on
                sw.between(topk_ids.shape[0], enter - left_s)
        ids = ids_on_host(topk_ids)  # the one host read of the layer (device_io.py)
        self.host.saw(topk_ids, ids)
        keys = [(l, e) for e in used_experts(ids)]
        # the shadow LRU sees every visit (prediction on or off) before its prefetches are planned
        lru = 0 if pred.budget is None else pred.budget.visit(keys)
        t_host = time.perf_counter()
        if predicting:
            pred.prefetcher.observe(l, keys)  # scores the forecasts made for l (calibration)
            predicted, position = pred.forecast(l, now, self.state)
        else:
            predicted = position = None
        if self.tickets:
            self.tickets.reap()
            self.tickets.drop(l, keys, predicted)
        host_s = time.perf_counter() - t_host
        st, counters = self.state, self.layers[l]
        st.clear_needed()  # the previous layer has run (on CUDA: was enqueued before this one)
        st.mark_needed(keys)
        stall = self.tickets.land(keys)
        host = self.host.choose(ids, [k for k in keys if not st.is_resident(k)])
        skip = [(l, e) for e in host]
        self.tickets.reclaim(keys, skip)
        plan = plan_demand(st, keys, self.cfg.policy, predicted, skip=skip, position=position)
        # Each load is in flight until its copy is done, so a failed read can be aborted.
        results = st.apply_demand(plan, now, in_flight=True)
        counters.hits += len(plan.hits)
        counters.prefetch_hits += sum(r == "prefetch_hit" for r in results.values())
        counters.misses += len(plan.misses)
        counters.streamed += len(plan.streamed)
        # Invariant: a host expert stays non-resident (slot_of -1) for this layer, so the device
        # backend skips exactly the choices host_compute adds.
        counters.host_computed += len(host)
        self.host.computed += len(host)
        stall += self._load_misses(plan.loads)
        out = None
        if plan.streamed:
            skipped = set(plan.skipped)
            out, seconds = self.fast.layer_experts([k for k in keys if k not in skipped], plan.streamed,
                                                   self.transfer.load_now)
            stall += seconds
        if timer.deferred:  # CUDA: the compute stream's time in here (its copies and waits)
            timer.measure(mark, timer.mark(), partial(self._add_stall, l))
        else:
            self._add_stall(l, stall)
        t_pre = time.perf_counter()
        issued = self._prefetch(now, predicted, position) if predicting else 0
        if sw is not None:
            sw.add(inside_s=host_s + time.perf_counter() - t_pre, forecaster_s=pred.spent(),
                   stall_s=stall, loads=len(plan.loads) + len(plan.streamed) + issued)
            sw.visit(lru)
        if out is None:
            out = self.fast.resident_experts(l)
        if host:
            out.host_compute = self.host.compute_fn(l, host)
        # Layer time for lookahead auto: from leaving this prepare to entering the next, i.e. the
        # compute of this layer (stalls are inside prepare, so excluded).
        # The same moment on the host clock too: the switch weighs host time.
        self._last = (l, timer.mark(), time.perf_counter(), issued, len(plan.loads) + len(plan.streamed))
        return out

    def _add_stall(self, l: int, seconds: float) -> None:
        self.state.add_stall(seconds)
        self.layers[l].stall_s += seconds

    # -- prefetch ---------------------------------------------------------------------------------
    def start_prefetch(self, *, depth: int | str = 1, max_depth: int = 1, owner=None) -> Prefetcher:
        """Prefetch from the forecasts the model hands to `prefetch`; `owner` (what makes them, e.g.
        the hub's OnlinePredictor) reports its stats with the cache's and is stopped on close."""
        return self.prediction.start(self.cfg, self.state, depth=depth, max_depth=max_depth, owner=owner)

    @property
    def prefetcher(self) -> Prefetcher | None:
        return self.prediction.prefetcher

    @property
    def switch(self) -> PrefetchSwitch | None:
        """prefetch_switch measured: prediction on only while it pays (prefetch_switch.py)."""
        return self.prediction.switch

    @property
    def forecaster(self):
        """What makes the forecasts this cache prefetches from (None without prefetch)."""
        return self.prediction.source

    def prefetch(self, forecasts: Sequence[Forecast]) -> None:
        """ExpertStore.prefetch: the forecasts made after layer l routed, before prepare(l). They
        only replace the prefetcher's forecast here; prepare(l) issues the copies once l's own
        demand loads are done, so a prefetch never takes a slot or the link from the layer running."""
        self.prediction.feed(forecasts)

    def _prefetch(self, now: int, predicted, position) -> int:
        """Issue up to prefetch_queue copies for the latest forecast; returns how many."""
        p = self.prediction.prefetcher
        if p is None or p.limit <= 0 or not predicted:
            return 0
        st = self.state
        candidates = p.candidates(st.entries)
        costs = None
        if self.cfg.prefetch_rule == "cost":
            queued = self.transfer.pending()  # waiting, or on the device and not finished
            self.queued_reads.add(queued)
            # demand reads per visit as replay counts them (ticks count visits)
            costs = p.costs(queued, st.victim_reuse(), st.stats.misses / max(now, 1))
        limit = min(p.limit, self.transfer.room())
        if self.prediction.budget is not None:  # loads_budget.py: reads beyond it are refused
            limit = self.prediction.budget.limit(st.stats.loads, limit)
        plan = plan_prefetch(st, candidates, predicted, limit, position, costs)
        self.prefetches_declined += max(0, min(len(candidates), p.limit) - len(plan.loads))
        # Invariant: each key is in flight in CacheState from here until its ticket is finished,
        # so no one evicts it or hands its slot to another key while the worker writes into it.
        st.apply_prefetch(plan, now, in_flight=True)
        for load in plan.loads:
            self.tickets.add(load.key, self.transfer.submit(load.key, *self.fast.slot(load.key, load.slot)))
        return len(plan.loads)

    def settle(self) -> None:
        """Wait for every issued prefetch to land and account it (model thread, between layers).
        Replay assumes exactly this (loads are instant); close() uses it after cancelling."""
        self.tickets.settle()

    def _load_misses(self, loads) -> float:
        """Demand-load the planned misses on this thread; returns the seconds taken. If a read
        fails, the loads not done are aborted (their slots hold no bytes) and the error raised."""
        t0 = time.perf_counter()
        for i, load in enumerate(loads):
            try:
                ticket = self.transfer.load_now(load.key, *self.fast.slot(load.key, load.slot))
            except BaseException:
                for rest in loads[i:]:
                    self.state.abort_load(rest.key)
                raise
            self.state.complete(load.key)
            self._time_copy(ticket, demand=True)  # a demand read costs what a prefetch read does
        return time.perf_counter() - t0

    def _time_copy(self, ticket: Ticket, demand: bool = False) -> None:
        """Fold a copy's time into the measured read time (lookahead auto, the cost rule) and, on
        CUDA, the link bandwidth (host compute's rule), once known: at once on the CPU, when its
        events have completed on CUDA (device_timing.py). A demand read also tells the prefetch
        switch what a load costs (quiet: no prefetch shared the link with it)."""
        if ticket.start is None or ticket.end is None:
            return
        cuda, nbytes = self.device.type == "cuda", self.state.key_bytes(ticket.key)
        quiet = not self.tickets

        def done(device_s: float) -> None:
            ticket.seconds = ticket.host_s + device_s
            if self.prefetcher is not None:
                self.prefetcher.record_transfer(ticket.seconds)
            if demand and self.switch is not None:
                self.switch.record_read(ticket.seconds, quiet=quiet)
            if cuda and device_s > 0:
                self.host.link_bps.add(nbytes / device_s)

        self.timer.measure(ticket.start, ticket.end, done)

    # -- residency probe (moe_rt.engine.decode_policy.CacheProbe: what expert_aware asks) ------
    def resident_experts(self, layer: int) -> frozenset[int]:
        return frozenset(self.state.layer_slots.get(layer, {}))

    def load_clock(self) -> tuple[int, float]:
        return self.state.stats.loads - self.host.computed, self.state.stats.stall_s

    # -- reporting --------------------------------------------------------------------------------
    def stats(self) -> dict:
        self.timer.poll(wait=True)  # a report, not a layer: wait for the device timings
        s = self.state.stats.as_dict()
        p, h, t = self.prefetcher, self.host, self.tickets
        out = {
            **s,
            "offload": self.tier.name, "policy": self.cfg.policy, "scope": self.cfg.scope,
            "capacity_slots": self.capacity_slots, "expert_bytes": self._expert_bytes,
            "expert_format": self.fast.format_label(),
            **({} if self.plan is None else {
                "expert_bytes_by_width": {str(w): b for w, b in zip(WIDTHS, self.plan.class_bytes) if b},
                "pool_slots_by_width": self.fast.slots_by_width()}),
            "bytes_moved_total": sum(s["bytes_moved"].values()),
            # a host-computed miss is a fast-tier miss that copied nothing: loads are copies only
            "loads": s["loads"] - h.computed,
            "cpu_compute_on_miss": h.mode, "host_computed": h.computed,
            "host_computed_rows": h.rows, "host_compute_s": h.seconds,
            "host_bytes_not_moved": h.computed * self._expert_bytes,
            "host_row_s_avg": h.row_s.value, "link_bytes_per_s": h.link_bps.value,
            "prefetches_cancelled": t.cancelled, "prefetches_cancelled_by": dict(t.cancelled_by),
            "prefetches_proven_wrong": t.proven_wrong, "copies_in_flight": self.cfg.copies_in_flight,
            "prefetch_rule": self.cfg.prefetch_rule, "prefetches_declined": self.prefetches_declined,
            "read_bytes_per_s": (None if p is None or not p.transfer_s.value
                                 else self._expert_bytes / p.transfer_s.value),
            "victim_reuse": self.state.victim_reuse(), "queued_reads_avg": self.queued_reads.value,
            "forecast_precision": None if p is None else {d: p.accuracy.precision(d)
                                                          for d in sorted(p.accuracy.visits)},
            "lookahead": None if p is None else p.depth,
            "transfer_s_avg": None if p is None else p.transfer_s.value,
            "layer_s_avg": None if p is None else p.layer_s.value,
            **({} if self.switch is None else self.switch.stats()),
            **({} if self.prediction.budget is None else self.prediction.budget.stats()),
            "per_layer": {l: asdict(c) for l, c in enumerate(self.layers)},
        }
        source = self.forecaster
        if source is not None and hasattr(source, "stats"):
            out["predictor"] = source.stats()
        return out

    def close(self) -> None:
        """Stop the predictor feed and the transfer worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.prediction.stop()
        self.transfer.close()
        self.settle()  # every ticket is cancelled or completed now; clears in-flight marks
        self.tier.close()
