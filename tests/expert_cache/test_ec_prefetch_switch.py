"""The measured prediction switch: the pure rule (next_switch), the shadow LRU it compares
against (checked against the real LRU cache on the same accesses), and the cache pausing and
resuming its forecaster when prediction does not pay."""
import pytest
import torch

import ec_fakes
from ec_helpers import random_trace
from expert_cache.prefetch_switch import PrefetchSwitch, ShadowLRU, SwitchState, Window, next_switch
from router_predict.trace import step_bounds


def win(host_ms, stall_ms, lru_loads=10, loads=10, read_ms=1.0):
    return Window(host_ms / 1e3, stall_ms / 1e3, lru_loads, loads, read_ms / 1e3)


ON = SwitchState(on=True)


def test_starts_off_for_one_baseline_window_then_probes():
    s = SwitchState()
    assert not s.on
    s = next_switch(s, None)
    assert s.on and s.probe and s.changes == 1


def test_where_prediction_never_pays_probes_come_after_1_4_8_16_windows_off():
    s, offs, run = SwitchState(), [], 0
    while len(offs) < 5:
        if s.on:
            offs.append(run)
            run = 0
            s = next_switch(s, win(100, 0))
        else:
            run += 1
            s = next_switch(s, None)
    assert offs == [1, 4, 8, 16, 32]


def test_stays_on_while_the_saved_stall_pays_for_the_host_time():
    # LRU would have stalled 10 x 1 ms; 4 ms measured: 6 ms saved for 5 ms of host work
    s = next_switch(ON, win(5, 4))
    assert s.on and s.changes == 0


def test_turns_off_when_the_host_time_exceeds_the_saving():
    s = next_switch(ON, win(7, 4))
    assert not s.on and s.changes == 1 and s.backoff == 4


def test_turns_off_when_loads_exceed_the_byte_budget_even_if_faster():
    assert not next_switch(ON, win(0, 0, lru_loads=10, loads=12)).on
    assert next_switch(ON, win(0, 0, lru_loads=10, loads=11)).on  # 1.1x: allowed


def test_probes_after_the_backoff_and_a_probe_must_clear_the_margin():
    s = next_switch(ON, win(7, 4))
    for _ in range(3):
        s = next_switch(s, None)
        assert not s.on
    s = next_switch(s, None)
    assert s.on and s.probe
    # 6 ms saved against 5.6 ms: enough to stay on, not enough for a probe (margin 10%)
    failed = next_switch(s, win(5.6, 4))
    assert not failed.on and failed.backoff == 8
    kept = next_switch(s, win(5.4, 4))
    assert kept.on and not kept.probe and kept.backoff == 4


def test_failed_probes_double_the_backoff_up_to_the_cap():
    s = SwitchState(on=True, probe=True, backoff=32)
    s = next_switch(s, win(100, 0), max_backoff=64)
    assert s.backoff == 64
    s = next_switch(SwitchState(on=True, probe=True, backoff=64), win(100, 0), max_backoff=64)
    assert s.backoff == 64


def _accesses(trace, L):
    for _, a, b in step_bounds(trace.steps):
        for l in range(L):
            yield l, torch.from_numpy(trace.topk_ids[a:b, l]).long()


@pytest.mark.parametrize("scope, slots", [("per_layer", 4), ("global", 7)])
@pytest.mark.parametrize("seed", range(2))
def test_shadow_lru_counts_the_loads_the_lru_cache_makes(seed, scope, slots):
    L, E = 3, 6
    trace = random_trace(seed, n=80, num_layers=L, num_experts=E)
    pinned = {1: [0]}
    cache, _, _ = ec_fakes.make_cache(L, E, slots, prefetch=False, policy="lru", scope=scope, pinned=pinned)
    shadow = ShadowLRU.of(cache.state)
    shadow_loads = 0
    try:
        for l, topk in _accesses(trace, L):
            cache.prepare(l, topk)
            shadow_loads += shadow.visit([(l, e) for e in topk.unique().tolist()])
        assert shadow_loads == cache.stats()["loads"] > 0
    finally:
        cache.close()


class PausableSource(ec_fakes.Source):
    """A forecaster that reports a large host cost, as the switch reads it (spent_s)."""

    def __init__(self, cache, num_experts, cost_per_forecast_s):
        super().__init__(cache, num_experts)
        self.spent_s, self.cost = 0.0, cost_per_forecast_s
        self.paused, self.pauses, self.resumes = False, 0, 0

    def pause(self):
        self.paused, self.pauses = True, self.pauses + 1

    def resume(self):
        self.paused, self.resumes = False, self.resumes + 1

    def forecast(self, target, experts, d=1):
        if not self.paused:
            self.spent_s += self.cost
            super().forecast(target, experts, d)


def test_the_cache_pauses_a_forecaster_that_costs_more_than_it_saves_then_probes():
    L, E = 3, 6
    cache, tier, _ = ec_fakes.make_cache(L, E, 2, policy="predictive", prefetch_switch="measured")
    src = PausableSource(cache, E, cost_per_forecast_s=0.05)  # 50 ms per forecast: never pays
    cache.prediction.source = src
    trace = random_trace(0, n=400, num_layers=L, num_experts=E, tokens_per_step=1)
    issued_while_paused = 0
    try:
        for l, topk in _accesses(trace, L):
            if l + 1 < L:
                src.forecast(l + 1, topk.flatten().tolist())  # an exact forecast of the next layer
            before = cache.stats()["prefetches_issued"]
            paused = src.paused
            cache.prepare(l, topk)
            cache.settle()
            if paused and src.paused:
                issued_while_paused += cache.stats()["prefetches_issued"] - before
        stats = cache.stats()
    finally:
        cache.close()
    assert src.pauses >= 2 and src.resumes >= 1  # off, probed, off again
    assert issued_while_paused == 0
    assert stats["prefetches_issued"] > 0  # it did prefetch while measuring
    assert 0 < stats["prefetch_on_fraction"] < 0.5
    assert stats["switch_cost_ms"] > stats["switch_benefit_ms"]


def test_a_switch_that_never_measured_a_read_keeps_prediction_on():
    sw = PrefetchSwitch(window_visits=2)
    for _ in range(2):
        sw.visit(1)
    assert sw.step_boundary() and sw.on  # the baseline window passed: probing
    sw.add(inside_s=10.0)
    for _ in range(4):
        sw.visit(1)
    assert not sw.step_boundary() and sw.on  # no read time known: nothing to weigh yet


def test_the_time_between_prepares_counts_against_its_off_baseline_per_batch_size():
    sw = PrefetchSwitch(window_visits=1)
    sw.between(1, 0.010)  # off: baseline of one-token visits
    sw.between(16, 0.050)  # and of 16-token ones
    sw.visit(1)
    sw.record_read(0.001, quiet=True)
    assert sw.step_boundary() and sw.on
    sw.between(1, 0.013)  # 3 ms slower than off
    sw.between(16, 0.050)
    sw.between(4, 0.5)  # no baseline for 4 rows: not counted
    sw.add(inside_s=0.001, forecaster_s=0.002, stall_s=0.0)
    sw.visit(1)  # an LRU load: 1 ms of stall saved
    assert sw.step_boundary() and not sw.on
    (w,) = sw.windows
    assert w.cost_s == pytest.approx(0.001 + 0.003) and w.benefit_s == pytest.approx(0.001)
