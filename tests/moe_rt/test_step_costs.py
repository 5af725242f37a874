"""StepCostModel: the fixed, per-token and per-load parts of a decode step, from samples."""
import pytest

from moe_rt.engine.step_costs import EPOCH, KEEP, MIN_SAMPLES, REVISIT, SHRINK_GAIN, ShrinkGate, StepCostModel


def test_no_estimate_until_enough_steps():
    m = StepCostModel()
    for _ in range(MIN_SAMPLES - 1):
        m.add(8, 0.01, 2, 0.002)
    assert m.estimate() is None
    m.add(8, 0.01, 2, 0.002)
    assert m.estimate() is not None


def test_fits_fixed_and_per_token_time_and_reads_from_the_load_clock():
    m = StepCostModel()
    for n, loads in [(4, 10), (8, 20), (16, 30), (12, 0), (6, 5)]:
        step = 0.002 + 0.0005 * n + 0.0001 * loads  # fixed 2 ms, 0.5 ms per token, 0.1 ms per load
        m.add(n, step, loads, 0.0001 * loads)
    c = m.estimate()
    assert c.fixed_s == pytest.approx(0.002) and c.token_s == pytest.approx(0.0005)
    assert c.read_s == pytest.approx(0.0001)


def test_same_sized_steps_count_all_but_loads_as_fixed():
    """token_s cannot be told from fixed_s: taken as 0, which favours the whole batch."""
    m = StepCostModel()
    for step in (0.010, 0.012, 0.011, 0.013):
        m.add(16, step, 0, 0.0)
    c = m.estimate()
    assert (c.fixed_s, c.token_s, c.read_s) == (pytest.approx(0.0115), 0.0, 0.0)


def test_outliers_and_bad_samples_are_dropped_and_slope_clamped():
    m = StepCostModel()
    for n in (4, 8, 4, 8):
        m.add(n, 0.010, 0, 0.0)
    m.add(8, 1.0, 0, 0.0)  # a pause: 100x the median
    m.add(0, 0.5, 0, 0.0)  # no tokens: not a sample
    m.add(4, -1.0, 0, 0.0)
    c = m.estimate()
    assert c.fixed_s == pytest.approx(0.010) and c.token_s == 0.0
    m2 = StepCostModel()
    for n, step in [(4, 0.02), (8, 0.01), (4, 0.02), (8, 0.01)]:  # bigger steps faster: noise, not a rule
        m2.add(n, step, 0, 0.0)
    assert m2.estimate().token_s == 0.0


def _epochs(gate, rates: dict[str, float], epochs: int) -> list[str]:
    """Run `epochs` epochs, each step of a mode at its tokens/s in `rates`; the modes run."""
    modes = []
    for _ in range(epochs):
        modes.append(gate.mode)
        for _ in range(EPOCH):
            gate.add(10, 10 / rates[gate.mode])
    return modes


def test_shrink_gate_tries_both_then_keeps_the_faster_and_revisits():
    gate = ShrinkGate()
    modes = _epochs(gate, {"whole": 100.0, "shrink": 90.0}, 2 + 2 * (REVISIT + 1))
    assert modes[:2] == ["whole", "shrink"]
    rest = modes[2:]
    assert rest.count("shrink") == 2 and rest[REVISIT] == "shrink"  # one revisit per REVISIT epochs
    assert gate.stats()["shrink_epoch_tok_s"] == pytest.approx(90.0)
    gate = ShrinkGate()
    modes = _epochs(gate, {"whole": 100.0, "shrink": 120.0}, 2 + REVISIT + 1)
    assert modes[1:1 + REVISIT] == ["shrink"] * REVISIT and modes[1 + REVISIT] == "whole"
    assert gate.stats()["whole_epoch_tok_s"] == pytest.approx(100.0)
    assert gate.stats()["shrink_epoch_tok_s"] == pytest.approx(120.0)


def test_shrink_gate_needs_a_clear_gain_and_follows_a_change():
    gate = ShrinkGate()
    assert _epochs(gate, {"whole": 100.0, "shrink": 100.0 * SHRINK_GAIN * 0.99}, 6)[2:] == ["whole"] * 4
    modes = _epochs(gate, {"whole": 100.0, "shrink": 200.0}, 3 * REVISIT)  # shrinking starts to pay
    assert modes[-2 * REVISIT:].count("whole") <= 2  # found at the next revisit, kept since
    gate.add(0, 1.0)  # no tokens: not a sample
    gate.add(5, 0.0)
    assert gate._steps == 0
