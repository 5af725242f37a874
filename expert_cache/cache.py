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
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch

from expert_cache.config import CacheConfig
from expert_cache.cost_model import PCIE4_BYTES_PER_S, HostRule, choose_host_experts
from expert_cache.device_io import HostCopies, ids_on_host, pinned_zeros, slot_map, to_device, used_experts
from expert_cache.device_timing import device_timer
from expert_cache.packs import aligned_empty
from expert_cache.planning import (demand_shortfall, plan_demand, plan_prefetch, prefetches_to_drop,
                                   prefetches_to_reclaim)
from expert_cache.policies import ExpertKey, Position
from expert_cache.prefetch_switch import PrefetchSwitch, ShadowLRU
from expert_cache.prefetcher import MovingAverage, Prefetcher
from expert_cache.records import ExpertFormat
from expert_cache.slow_tier import SlowTier
from expert_cache.state import CacheState
from expert_cache.transfer import Ticket, TransferEngine
from expert_cache.widths import WidthPlan, check_pins, pool_slots
from moe_rt.errors import MoeRtError
from moe_rt.kernels.loop import loop_experts
from moe_rt.layers.moe.compute_quant import quantized_experts
from moe_rt.layers.moe.events import Forecast
from moe_rt.layers.moe.store import ExpertStore, LayerExperts
from moe_rt.quant.experts import QuantizedStack
from moe_rt.quant.mixed import MixedStack
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
        if plan is not None:
            self._init_width_pools(cfg, plan, tier.name)
        else:
            # Bytes of one expert as stored and moved: every count (capacity, bytes moved) uses it.
            self._expert_bytes = (spec.bytes_per_expert(torch.empty((), dtype=dtype).element_size())
                                  if fmt is None else fmt.record_bytes)
            self.capacity_slots = cfg.resolve_capacity_slots(self._expert_bytes, L, E)
            self.state = CacheState(L, self.capacity_slots, cfg.scope, self._expert_bytes, tier.name)
            pools = L if cfg.scope == "per_layer" else 1
            # quantized: slot s of a pool is arenas[pool][s], the stacks are views of those bytes
            staged = [self._staging(fmt, self.capacity_slots) for _ in range(pools)]
            self.w13, self.w2, self.arenas = (list(t) for t in zip(*staged))
        self.timer = device_timer(self.device) if timer is None else timer
        self.transfer = TransferEngine(tier, self.device, max_queued=max(1, 2 * cfg.prefetch_queue),
                                       copies_in_flight=cfg.copies_in_flight, timer=self.timer)
        self._slot_maps: dict[int, tuple[list[int], torch.Tensor]] = {}  # layer -> (map, on device)
        self._tickets: dict[ExpertKey, Ticket] = {}  # in-flight prefetches
        self.prefetcher: Prefetcher | None = None
        self._source = None  # what feeds the prefetcher (OnlinePredictor), stopped on close
        # prefetch_switch measured: prediction on only while it pays (prefetch_switch.py)
        self.switch: PrefetchSwitch | None = None
        self._spent_seen = 0.0  # the source's host seconds already handed to the switch
        self._feed_s = 0.0  # host seconds in prefetch() (forecasts fed) since the last prepare
        self._tick = 0
        # (layer, timer mark leaving prepare, prefetches issued, demand loads) of the last prepare
        self._last: tuple[int, object, int, int] | None = None
        self.queued_reads = MovingAverage()  # transfer queue occupancy when prefetches are planned
        self.prefetches_declined = 0  # forecast keys not issued (cost rule, no slot)
        self.layers = [LayerCounters() for _ in range(L)]
        self.cancelled = 0  # prefetches cancelled before they were submitted (moved no bytes)
        # ... by reason: its layer ran without it, its forecast was withdrawn, a miss took its slot
        self.cancelled_by = {"wrong": 0, "withdrawn": 0, "demand": 0}
        self.proven_wrong = 0  # prefetches already copying when their layer ran without them
        self._closed = False
        # Host compute of misses (cpu_compute_on_miss). The tier must hold whole layers in RAM.
        self.host_mode = cfg.cpu_compute_on_miss if tier.host_layer(0) is not None else False
        self._flops_per_row = 2 * 3 * D * I
        self.host_row_s = MovingAverage()  # host seconds per (token, expert) pair, measured
        self.link_bps = MovingAverage()  # host -> device bytes/s, measured (CUDA, auto only)
        self.host_computed = 0  # experts (layer visits) run on the host
        self.host_rows = 0  # (token, expert) pairs run on the host
        self.host_s = 0.0
        if self.host_mode == "auto" and self.device.type == "cuda":
            self._measure_link()
        for key in cfg.pinned_keys():
            slot = self.state.pin(key, now=-1)
            self.transfer.load_now(key, *self._slot(key, slot))
        self._host_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # (device ids, host copy)

    def _init_width_pools(self, cfg: CacheConfig, plan: WidthPlan, source: str) -> None:
        """Pools per (layer or global, width) sized by widths.pool_slots; per layer the MixedStacks
        of its non-empty pools (parts widest first, as the resident store orders them) and each
        class's first virtual slot, so slot_of = part offset + slot in the width's pool."""
        L, C = self.num_layers, len(WIDTHS)
        slots = pool_slots(cfg, plan)
        check_pins(cfg, plan, slots)
        self.state = CacheState(L, max(slots.values()), cfg.scope, 0, source, class_of=plan.class_of,
                                classes=C, pool_slots=slots, class_bytes=plan.class_bytes)
        per_base = [sum(slots[b * C + c] for c in range(C)) for b in range(len(slots) // C)]
        self.capacity_slots = max(per_base)  # slots of the largest layer (or of the global pools)
        every = [plan.class_bytes[plan.class_of((l, e))] for l in range(L) for e in range(self.num_experts)]
        self._expert_bytes = sum(every) // len(every)  # mean real bytes per expert (rates, stats)
        staged = [self._staging(plan.fmt(WIDTHS[pool % C]), slots[pool]) for pool in range(len(slots))]
        self.w13, self.w2, self.arenas = (list(t) for t in zip(*staged))
        # per layer: its MixedStacks and each expert's first virtual slot (its part's offset)
        self._mixed: list[tuple[MixedStack, MixedStack, list[int]]] = []
        for l in range(L):
            base = (l if cfg.scope == "per_layer" else 0) * C
            used = [base + c for c in range(C) if slots[base + c] > 0]
            offsets, o = [0] * C, 0
            for p in used:
                offsets[p - base] = o
                o += slots[p]
            self._mixed.append((MixedStack(tuple(self.w13[p] for p in used)),
                                MixedStack(tuple(self.w2[p] for p in used)),
                                [offsets[plan.class_of((l, e))] for e in range(self.num_experts)]))

    def _staging(self, fmt: ExpertFormat | None, n: int):
        """n slots in one width's form: (w13, w2, records arena or None for dense slots)."""
        if fmt is None:
            D, I = self.spec.hidden_size, self.spec.moe.intermediate_size
            return self._buffer((n, 2 * I, D)), self._buffer((n, D, I)), None
        arena = fmt.arena(n)
        return (*fmt.stacks(arena), arena)

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A fast-tier buffer; on the CPU page-aligned, so the disk tier reads straight into its
        slots (packs.PackTier, O_DIRECT)."""
        if self.device.type == "cpu":
            return aligned_empty(shape, self.dtype)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    # -- ExpertStore ------------------------------------------------------------------------------
    def expert_bytes(self) -> int:
        """Bytes of the fast tier (all slots)."""
        return sum(a.numel() if a is not None else b.numel() * b.element_size() + c.numel() * c.element_size()
                   for a, b, c in zip(self.arenas, self.w13, self.w2))

    def prepare(self, moe_index: int, topk_ids: torch.Tensor) -> LayerExperts:
        timer = self.timer
        timer.poll()  # device timings that completed since (queries only, never a wait)
        mark = timer.mark()
        enter = time.perf_counter()
        self._tick += 1
        now, l = self._tick, moe_index
        sw = self.switch
        if sw is not None and l == 0 and sw.step_boundary():
            self._predict(sw.on)
        predicting = self.prefetcher is not None and (sw is None or sw.on)
        if self._last is not None and self._last[0] == l - 1:
            _, left, issued, loads = self._last
            if self.prefetcher is not None:
                timer.measure(left, mark, partial(self.prefetcher.record_layer, issued=issued, misses=loads))
            if sw is not None:  # the switch weighs host time: how much longer layers take with prediction on
                sw.between(topk_ids.shape[0], enter - self._left_s)
        ids = ids_on_host(topk_ids)  # the one host read of the layer (device_io.py)
        self._host_ids = (topk_ids, ids)
        keys = [(l, e) for e in used_experts(ids)]
        t_host = time.perf_counter()
        if predicting:
            self.prefetcher.observe(l, keys)  # scores the forecasts made for l (calibration)
            predicted, position = self._forecast(l, now)
        else:
            predicted = position = None
        if self._tickets:
            self._reap()
            self._drop_prefetches(l, keys, predicted)
        host_s = time.perf_counter() - t_host
        st, counters = self.state, self.layers[l]
        st.clear_needed()  # the previous layer has run (on CUDA: was enqueued before this one)
        st.mark_needed(keys)
        stall = self._land(keys)
        host = self._host_experts(l, ids, [k for k in keys if not st.is_resident(k)])
        skip = [(l, e) for e in host]
        self._reclaim_slots(keys, skip)
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
        self.host_computed += len(host)
        stall += self._load_misses(plan.loads)
        out = None
        if plan.streamed:
            skipped = set(plan.skipped)
            out, seconds = self._layer_experts(l, [k for k in keys if k not in skipped], plan.streamed)
            stall += seconds
        if timer.deferred:  # CUDA: the compute stream's time in here (its copies and waits)
            timer.measure(mark, timer.mark(), partial(self._add_stall, l))
        else:
            self._add_stall(l, stall)
        t_pre = time.perf_counter()
        issued = self._prefetch(now, predicted, position) if predicting else 0
        if sw is not None:
            sw.add(inside_s=host_s + time.perf_counter() - t_pre, forecaster_s=self._source_spent(),
                   stall_s=stall, loads=len(plan.loads) + len(plan.streamed) + issued)
            sw.visit(keys)
        if out is None:
            out = self._resident_experts(l)
        if host:
            out.host_compute = self._host_compute_fn(l, host)
        # Layer time for lookahead auto: from leaving this prepare to entering the next, i.e. the
        # compute of this layer (stalls are inside prepare, so excluded).
        self._last = (l, timer.mark(), issued, len(plan.loads) + len(plan.streamed))
        self._left_s = time.perf_counter()  # the same moment on the host clock (the switch's)
        return out

    def _add_stall(self, l: int, seconds: float) -> None:
        self.state.add_stall(seconds)
        self.layers[l].stall_s += seconds

    def _resident_experts(self, l: int) -> LayerExperts:
        """Layer l's pools and slot map (under a plan: its MixedStacks, virtual slots). The map on
        the device is sent again only when CacheState's view of the layer changed."""
        slots = self.state.slot_map(l, self.num_experts)
        if self.plan is None:
            pool = self.state.pool_of((l, 0))
            w13, w2 = self.w13[pool], self.w2[pool]
        else:
            w13, w2, first = self._mixed[l]
            slots = [s if s < 0 else f + s for s, f in zip(slots, first)]
        sent = self._slot_maps.get(l)
        if sent is None or sent[0] != slots:
            sent = (slots, slot_map(slots, self.device))
            self._slot_maps[l] = sent
        return LayerExperts(w13, w2, sent[1])

    # -- host compute of misses --------------------------------------------------------------------
    def _host_experts(self, l: int, ids: torch.Tensor, missed: list[ExpertKey]) -> list[int]:
        """Missed expert ids of layer l to run on the host (cost_model.choose_host_experts);
        ids: the layer's routed ids [T, K], on the host."""
        if not missed or self.host_mode is False:
            return []
        flat = ids[ids >= 0]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rule = HostRule(self._expert_bytes, self.link_bps.value or PCIE4_BYTES_PER_S,
                        self._flops_per_row, self.host_row_s.value)
        return choose_host_experts(self.host_mode, {e: counts[e] for _, e in missed},
                                   same_device=self.device.type == "cpu", rule=rule)

    def _host_compute_fn(self, l: int, host: list[int]):
        """LayerExperts.host_compute for layer l: the weighted sum over the choices routed to the
        `host` experts, computed with the host tier's weights (no copy of them is made).

        Called before the device kernels of the layer are queued, it only starts the copies of
        its inputs to the host; the `finish` it returns, called after them, waits for those
        copies (queued before the device experts, so not for them), runs the host GEMMs while
        the device computes, and sends the partial output back without a host wait."""
        w13, w2 = self.tier.host_layer(l)  # [E, 2I, D], [E, D, I] by logical id
        on_host = torch.zeros(self.num_experts, dtype=torch.bool)
        on_host[host] = True
        seen = self._host_ids  # the routed ids prepare read: not copied again

        def host_compute(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
            known = seen is not None and topk_ids is seen[0]
            copies = HostCopies(hidden, topk_weights, *(() if known else (topk_ids,)))

            def finish() -> torch.Tensor:
                x_all, w_all, *rest = copies.wait()
                ids = seen[1] if known else rest[0]
                mine = (ids >= 0) & on_host[ids.clamp(min=0)]  # [T, K] choices computed here
                rows = mine.any(dim=1).nonzero().squeeze(1)  # tokens with at least one such choice
                out = pinned_zeros(hidden)
                if rows.numel() == 0:
                    return to_device(out, hidden.device)
                sub_ids = torch.where(mine[rows], ids[rows], -1)  # other choices ran on the device
                x, w = x_all.index_select(0, rows), w_all.index_select(0, rows)
                t0 = time.perf_counter()
                y = (quantized_experts if isinstance(w13, QuantizedStack) else loop_experts)(x, w13, w2, sub_ids, w)
                seconds = time.perf_counter() - t0
                out.index_add_(0, rows, y)
                pairs = int(mine.sum())
                self.host_rows += pairs
                self.host_s += seconds
                self.host_row_s.add(seconds / pairs)
                return to_device(out, hidden.device)

            return finish

        return host_compute

    def _measure_link(self) -> None:
        """Time one expert host -> device copy, synchronised (the transfer engine's own times do
        not wait for the GPU copy), as the first sample of the link bandwidth."""
        w13, w2 = self.tier.host_weights((0, 0))
        d13, d2 = torch.empty_like(w13, device=self.device), torch.empty_like(w2, device=self.device)
        for _ in range(2):  # the first copy pays one-off setup costs
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            d13.copy_(w13, non_blocking=True)
            d2.copy_(w2, non_blocking=True)
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
        self.link_bps.add(self._expert_bytes / max(seconds, 1e-9))

    # -- prefetch ---------------------------------------------------------------------------------
    def start_prefetch(self, *, depth: int | str = 1, max_depth: int = 1, owner=None) -> Prefetcher:
        """Prefetch from the forecasts the model hands to `prefetch`; `owner` (what makes them, e.g.
        the hub's OnlinePredictor) reports its stats with the cache's and is stopped on close."""
        if self.prefetcher is not None:
            raise MoeRtError("the expert cache already has a prefetcher")
        self.prefetcher = Prefetcher(self.num_layers, depth, max_depth, self.cfg.prefetch_queue)
        self._source = owner
        if self.cfg.prefetch_switch == "measured":
            # a window of 8 steps at batch 1: enough visits that one slow read does not decide
            self.switch = PrefetchSwitch(ShadowLRU.of(self.state), 8 * self.num_layers)
            if not self.switch.on and owner is not None and hasattr(owner, "pause"):
                owner.pause()  # the first window measures the baseline, prediction off
        return self.prefetcher

    def _predict(self, on: bool) -> None:
        """The switch turned prediction on or off: pause or resume the forecaster (off, the
        cache is LRU: no forecast ranks victims and nothing is prefetched)."""
        self.prefetcher.pause()
        source = self._source
        if source is not None and hasattr(source, "pause"):
            source.resume() if on else source.pause()

    def _source_spent(self) -> float:
        """Host seconds the forecaster and forecast feeding took since the last call."""
        spent, self._feed_s = self._feed_s, 0.0
        total = getattr(self._source, "spent_s", None)
        if total is not None:
            spent += total - self._spent_seen
            self._spent_seen = total
        return spent

    @property
    def forecaster(self):
        """What makes the forecasts this cache prefetches from (None without prefetch)."""
        return self._source

    def prefetch(self, forecasts: Sequence[Forecast]) -> None:
        """ExpertStore.prefetch: the forecasts made after layer l routed, before prepare(l). They
        only replace the prefetcher's forecast here; prepare(l) issues the copies once l's own
        demand loads are done, so a prefetch never takes a slot or the link from the layer running."""
        if self.prefetcher is not None and forecasts and (self.switch is None or self.switch.on):
            t0 = time.perf_counter()
            for forecast in forecasts:
                self.prefetcher.feed(forecast)
            self._feed_s += time.perf_counter() - t0

    def _load_misses(self, loads) -> float:
        """Demand-load the planned misses on this thread; returns the seconds taken. If a read
        fails, the loads not done are aborted (their slots hold no bytes) and the error raised."""
        t0 = time.perf_counter()
        for i, load in enumerate(loads):
            try:
                ticket = self.transfer.load_now(load.key, *self._slot(load.key, load.slot))
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
        quiet = not self._tickets

        def done(device_s: float) -> None:
            ticket.seconds = ticket.host_s + device_s
            if self.prefetcher is not None:
                self.prefetcher.record_transfer(ticket.seconds)
            if demand and self.switch is not None:
                self.switch.record_read(ticket.seconds, quiet=quiet)
            if cuda and device_s > 0:
                self.link_bps.add(nbytes / device_s)

        self.timer.measure(ticket.start, ticket.end, done)

    def _forecast(self, l: int, now: int):
        """The forecast in force with probabilities, and where it was made (ranks demand victims
        under policy predictive, and decides prefetches); (None, None) without prefetch."""
        p = self.prefetcher
        if p is None:
            return None, None
        return p.probabilities(), Position(l, self.num_layers, p.depth, now,
                                           self.state.reuse_probabilities())

    def _prefetch(self, now: int, predicted, position) -> int:
        """Issue up to prefetch_queue copies for the latest forecast; returns how many."""
        p = self.prefetcher
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
        plan = plan_prefetch(st, candidates, predicted, min(p.limit, self.transfer.room()),
                             position, costs)
        self.prefetches_declined += max(0, min(len(candidates), p.limit) - len(plan.loads))
        # Invariant: each key is in flight in CacheState from here until _finish, so no one
        # evicts it or hands its slot to another key while the worker writes into it.
        st.apply_prefetch(plan, now, in_flight=True)
        for load in plan.loads:
            self._tickets[load.key] = self.transfer.submit(load.key, *self._slot(load.key, load.slot))
        return len(plan.loads)

    def settle(self) -> None:
        """Wait for every issued prefetch to land and account it (model thread, between layers).
        Replay assumes exactly this (loads are instant); close() uses it after cancelling."""
        for key, ticket in list(self._tickets.items()):
            self._finish(key, ticket)

    def _reap(self) -> None:
        """Complete the prefetches that have landed (on CUDA: whose copy the device finished, so
        the compute stream is never made to wait for a copy a later layer needs)."""
        for key, ticket in list(self._tickets.items()):
            if self.transfer.landed(ticket):
                self._finish(key, ticket)

    def _land(self, keys: list[ExpertKey]) -> float:
        """Wait for the prefetches of `keys` still landing; a queued one is loaded now instead of
        after the queue (never two loads of one expert). Returns the seconds waited."""
        t0, waited = time.perf_counter(), False
        for key in keys:
            ticket = self._tickets.get(key)
            if ticket is None:
                continue
            waited = True
            if self.transfer.cancel(ticket):  # not started: load it on this thread
                try:
                    self.transfer.load_now(key, ticket.w13, ticket.w2)
                except BaseException:
                    self._abort(key)
                    raise
            self._finish(key, ticket)
        return time.perf_counter() - t0 if waited else 0.0

    def _finish(self, key: ExpertKey, ticket: Ticket) -> None:
        """The copy has landed (or was cancelled and loaded by _land, or cancelled by close): the
        key stops being in flight. A failed copy leaves partial bytes: its slot is freed and the
        error raised."""
        del self._tickets[key]
        try:
            self.transfer.wait(ticket)  # raises if the read failed; on CUDA orders the compute stream
        except MoeRtError:
            self.state.abort_load(key)
            raise
        self.state.complete(key)
        if ticket.prefetch and not ticket.cancelled:
            self._time_copy(ticket)

    def _abort(self, key: ExpertKey) -> None:
        """The copy into key's slot never happened: free the slot, take back the load's counts."""
        del self._tickets[key]
        self.state.abort_load(key)

    def _queued_keys(self) -> list[ExpertKey]:
        """Prefetches still in the host queue (not submitted: cancellable), in issue order."""
        return [k for k, t in self._tickets.items() if not t.started and not t.is_done()]

    def _cancel(self, key: ExpertKey, reason: str) -> bool:
        """Cancel key's queued copy (its slot was never written: no bytes counted, not an
        eviction nor a wasted prefetch); False if the worker submitted it meanwhile."""
        if not self.transfer.cancel(self._tickets[key]):
            return False
        self._abort(key)
        self.cancelled += 1
        self.cancelled_by[reason] += 1
        return True

    def _drop_prefetches(self, layer: int, used: list[ExpertKey], predicted) -> None:
        """Layer `layer` is about to run with `used`: cancel queued prefetches it proves wrong or
        whose forecast was withdrawn (planning.prefetches_to_drop); count submitted ones of
        `layer` it does not use as proven wrong (they land and may be wasted)."""
        wrong, withdrawn = prefetches_to_drop(self._queued_keys(), layer, used, predicted)
        for key in wrong:
            self._cancel(key, "wrong")
        for key in withdrawn:
            self._cancel(key, "withdrawn")
        needed = set(used)
        self.proven_wrong += sum(k[0] == layer and k not in needed for k in self._tickets)

    def _reclaim_slots(self, keys: list[ExpertKey], skip: list[ExpertKey]) -> None:
        """A miss with no slot left would be streamed: cancel queued prefetches of its pool to
        free theirs first (planning.demand_shortfall, prefetches_to_reclaim)."""
        if not self._tickets:
            return
        short = demand_shortfall(self.state, keys, skip)
        if short:
            for key in prefetches_to_reclaim(self._queued_keys(), short, self.state.pool_of):
                self._cancel(key, "demand")

    # -- slots ------------------------------------------------------------------------------------
    def _slot(self, key: ExpertKey, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a load of `key` into `slot` writes: (w13, w2) slot tensors, or for quantized
        pools (the slot's record bytes [stride], None), as the record tiers read."""
        pool = self.state.pool_of(key)
        if self.arenas[pool] is not None:
            return self.arenas[pool][slot], None
        return self.w13[pool][slot], self.w2[pool][slot]

    def _layer_experts(self, l: int, keys: list[ExpertKey], streamed: list[ExpertKey]):
        """A stack of exactly this layer's experts when some could not get a slot: resident ones
        copied from their slots, streamed ones read from the slow tier. Returns (experts, seconds)."""
        t0 = time.perf_counter()
        groups: dict[int, list[ExpertKey]] = {}  # width class (0 without a plan) -> keys, in order
        for key in keys:
            groups.setdefault(0 if self.plan is None else self.plan.class_of(key), []).append(key)
        parts13, parts2, dst, slot_of = [], [], {}, torch.full((self.num_experts,), -1, dtype=torch.int64)
        for c in sorted(groups):  # widest first: the order of the resident parts
            fmt = self.fmt if self.plan is None else self.plan.fmt(WIDTHS[c])
            w13, w2, arena = self._staging(fmt, len(groups[c]))
            for i, key in enumerate(groups[c]):
                slot_of[key[1]] = sum(p.shape[0] for p in parts13) + i
                dst[key] = (arena[i], None) if arena is not None else (w13[i], w2[i])
            parts13.append(w13)
            parts2.append(w2)
        streamed_set = set(streamed)
        for key in keys:
            if key in streamed_set:
                self.transfer.load_now(key, *dst[key])
            else:
                for d, src in zip(dst[key], self._slot(key, self.state.slot_of(key))):
                    if d is not None:
                        d.copy_(src)
        if self.plan is None:
            w13, w2 = parts13[0], parts2[0]
        else:
            w13, w2 = MixedStack(tuple(parts13)), MixedStack(tuple(parts2))
        return LayerExperts(w13, w2, to_device(slot_of, self.device)), time.perf_counter() - t0

    # -- residency probe (moe_rt.engine.decode_policy.CacheProbe: what expert_aware asks) ------
    def resident_experts(self, layer: int) -> frozenset[int]:
        return frozenset(self.state.layer_slots.get(layer, {}))

    def load_clock(self) -> tuple[int, float]:
        return self.state.stats.loads - self.host_computed, self.state.stats.stall_s

    # -- reporting --------------------------------------------------------------------------------
    def stats(self) -> dict:
        self.timer.poll(wait=True)  # a report, not a layer: wait for the device timings
        s = self.state.stats.as_dict()
        p = self.prefetcher
        out = {
            **s,
            "offload": self.tier.name, "policy": self.cfg.policy, "scope": self.cfg.scope,
            "capacity_slots": self.capacity_slots, "expert_bytes": self._expert_bytes,
            "expert_format": self._format_label(),
            **({} if self.plan is None else {
                "expert_bytes_by_width": {str(w): b for w, b in zip(WIDTHS, self.plan.class_bytes) if b},
                "pool_slots_by_width": self._slots_by_width()}),
            "bytes_moved_total": sum(s["bytes_moved"].values()),
            # a host-computed miss is a fast-tier miss that copied nothing: loads are copies only
            "loads": s["loads"] - self.host_computed,
            "cpu_compute_on_miss": self.host_mode, "host_computed": self.host_computed,
            "host_computed_rows": self.host_rows, "host_compute_s": self.host_s,
            "host_bytes_not_moved": self.host_computed * self._expert_bytes,
            "host_row_s_avg": self.host_row_s.value, "link_bytes_per_s": self.link_bps.value,
            "prefetches_cancelled": self.cancelled, "prefetches_cancelled_by": dict(self.cancelled_by),
            "prefetches_proven_wrong": self.proven_wrong, "copies_in_flight": self.cfg.copies_in_flight,
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
            "per_layer": {l: asdict(c) for l, c in enumerate(self.layers)},
        }
        if self._source is not None and hasattr(self._source, "stats"):
            out["predictor"] = self._source.stats()
        return out

    def _format_label(self) -> str:
        if self.plan is not None:
            return "plan(" + ", ".join("full" if w == "full" else self.plan.fmt(w).label()
                                       for w, b in zip(WIDTHS, self.plan.class_bytes) if b) + ")"
        return "dense" if self.fmt is None else self.fmt.label()

    def _slots_by_width(self) -> dict[str, int]:
        """Fast-tier slots of each width, over all pools."""
        out: dict[str, int] = {}
        for pool, n in self.state.pool_slots.items():
            w = str(WIDTHS[pool % len(WIDTHS)])
            out[w] = out.get(w, 0) + n
        return out

    def close(self) -> None:
        """Stop the predictor feed and the transfer worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._source is not None and hasattr(self._source, "stop"):
            self._source.stop()
        self.transfer.close()
        self.settle()  # every ticket is cancelled or completed now; clears in-flight marks
        self.tier.close()
