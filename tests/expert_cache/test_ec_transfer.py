"""Transfer engine: queued copies can be cancelled, started ones complete, errors reach the waiter."""
import threading

import pytest
import torch

from expert_cache.slow_tier import SlowTier
from expert_cache.transfer import TransferEngine
from moe_rt.errors import MoeRtError


class GatedTier(SlowTier):
    name = "disk"

    def __init__(self, hold=None, fail=None):
        self.hold, self.fail = hold, fail
        self.gate, self.entered = threading.Event(), threading.Event()
        self.reads = []

    def read_into(self, key, w13, w2):
        self.reads.append(key)
        if key == self.hold:
            self.entered.set()
            assert self.gate.wait(timeout=30)
        if key == self.fail:
            raise OSError("disk on fire")
        w13.fill_(key[1])
        w2.fill_(key[1])


def slots(n=3):
    return torch.zeros(n, 2, 2), torch.zeros(n, 2, 2)


def test_queued_copy_cancelled_started_copy_completes():
    tier = GatedTier(hold=(0, 1))
    eng = TransferEngine(tier, torch.device("cpu"), max_queued=4)
    w13, w2 = slots()
    try:
        first = eng.submit((0, 1), w13[0], w2[0])
        assert tier.entered.wait(timeout=30)
        second = eng.submit((0, 2), w13[1], w2[1])
        assert not eng.cancel(first)  # started: it will complete
        assert eng.cancel(second) and second.cancelled and second.is_done()
        tier.gate.set()
        eng.wait(first)
        assert w13[0].eq(1).all() and w13[1].eq(0).all()  # the cancelled slot was never written
        assert tier.reads == [(0, 1)]
    finally:
        tier.gate.set()
        eng.close()


def test_bounded_queue_and_errors_reach_the_waiter():
    tier = GatedTier(hold=(0, 0), fail=(0, 1))
    eng = TransferEngine(tier, torch.device("cpu"), max_queued=1)
    w13, w2 = slots()
    try:
        a = eng.submit((0, 0), w13[0], w2[0])
        assert tier.entered.wait(timeout=30)  # worker busy with a, queue empty
        b = eng.submit((0, 1), w13[1], w2[1])
        assert not eng.can_submit()
        with pytest.raises(MoeRtError, match="full"):
            eng.submit((0, 2), w13[2], w2[2])
        tier.gate.set()
        eng.wait(a)
        with pytest.raises(MoeRtError, match="disk on fire"):
            eng.wait(b)
    finally:
        tier.gate.set()
        eng.close()


def test_close_cancels_what_is_queued():
    tier = GatedTier(hold=(0, 0))
    eng = TransferEngine(tier, torch.device("cpu"), max_queued=4)
    w13, w2 = slots()
    a = eng.submit((0, 0), w13[0], w2[0])
    assert tier.entered.wait(timeout=30)
    b = eng.submit((0, 1), w13[1], w2[1])
    closer = threading.Thread(target=eng.close)
    closer.start()
    tier.gate.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert a.is_done() and not a.cancelled and b.cancelled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_side_stream_copy_is_visible_after_wait():
    from expert_cache.slow_tier import HostTier  # noqa: F401  (pinned host path)

    class PinnedTier(SlowTier):
        name = "cpu"

        def __init__(self):
            self.w = {k: (torch.full((64, 32), float(k[1])).pin_memory(),
                          torch.full((32, 32), float(k[1])).pin_memory()) for k in [(0, 0), (0, 1)]}

        def read_into(self, key, w13, w2):
            w13.copy_(self.w[key][0], non_blocking=True)
            w2.copy_(self.w[key][1], non_blocking=True)

        def host_weights(self, key):
            return self.w[key]

    dev = torch.device("cuda")
    eng = TransferEngine(PinnedTier(), dev)
    w13, w2 = torch.zeros(2, 64, 32, device=dev), torch.zeros(2, 32, 32, device=dev)
    try:
        t = eng.submit((0, 1), w13[1], w2[1])
        eng.load_now((0, 0), w13[0], w2[0])
        t.done.wait()
        eng.wait(t)
        assert (w13[1] * 1).eq(1).all().item() and w2[0].eq(0).all().item()
    finally:
        eng.close()


class _Reader:
    """read_expert of a checkpoint reader: expert (l, e) filled with 10 l + e."""

    def read_expert(self, spec, l, e):
        D, I = spec.hidden_size, spec.moe.intermediate_size
        return torch.full((2 * I, D), 10.0 * l + e), torch.full((D, I), 10.0 * l + e)


def _spec():
    from types import SimpleNamespace

    return SimpleNamespace(moe_layer_ids=(0, 1), num_experts=3, hidden_size=4,
                           moe=SimpleNamespace(intermediate_size=6))


def test_host_tier_is_not_pinned_for_a_cpu_fast_tier():
    from expert_cache.slow_tier import HostTier

    tier = HostTier(_Reader(), _spec(), torch.float32)
    assert not tier.w13[0].is_pinned() and tier.host_weights((1, 2))[0][0, 0] == 12
    tier.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_tier_pins_its_own_pages_for_a_gpu():
    """Registered in place (exactly its bytes, no power-of-two pinned block), copied asynchronously."""
    from expert_cache.slow_tier import HostTier

    tier = HostTier(_Reader(), _spec(), torch.bfloat16, pin=True)
    assert all(t.is_pinned() for t in tier.w13 + tier.w2) and tier._registered
    w13, w2 = torch.empty(12, 4, dtype=torch.bfloat16, device="cuda"), torch.empty(4, 6, dtype=torch.bfloat16, device="cuda")
    tier.read_into((1, 2), w13, w2)
    torch.cuda.synchronize()
    assert (w13 == 12).all() and (w2 == 12).all()
    tier.close()
    assert tier._registered == []
